from blip2_triton.triton_model import RetrievalVisionModel, python_model

TritonPythonModel = python_model(RetrievalVisionModel)
