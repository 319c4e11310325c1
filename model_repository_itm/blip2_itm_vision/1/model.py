from blip2_triton.serving.models import RetrievalVisionModel, python_model

TritonPythonModel = python_model(RetrievalVisionModel)
