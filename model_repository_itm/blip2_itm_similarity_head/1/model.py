from blip2_triton.serving.models import RetrievalSimilarityModel, python_model

TritonPythonModel = python_model(RetrievalSimilarityModel)
