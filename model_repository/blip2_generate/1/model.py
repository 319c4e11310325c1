from blip2_triton.triton_model import CollectorModel, python_model

TritonPythonModel = python_model(CollectorModel)
