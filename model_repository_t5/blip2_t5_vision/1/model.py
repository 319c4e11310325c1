from blip2_triton.serving.models import VisionModel, python_model

TritonPythonModel = python_model(VisionModel)
