from blip2_triton.serving.models import StreamModel, python_model

TritonPythonModel = python_model(StreamModel)
