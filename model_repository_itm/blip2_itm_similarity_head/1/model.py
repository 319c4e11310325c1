from blip2_triton.triton_model import RetrievalSimilarityModel, python_model

TritonPythonModel = python_model(RetrievalSimilarityModel)
