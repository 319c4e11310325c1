from blip2_triton.serving.models import RetrievalMatchModel, python_model

TritonPythonModel = python_model(RetrievalMatchModel)
