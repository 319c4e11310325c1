from blip2_triton.triton_model import RetrievalMatchModel, python_model

TritonPythonModel = python_model(RetrievalMatchModel)
