from blip2_triton.triton_model import VisionModel, python_model

TritonPythonModel = python_model(VisionModel)
