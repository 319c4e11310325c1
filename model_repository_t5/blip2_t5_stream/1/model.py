from blip2_triton.triton_model import StreamModel, python_model

TritonPythonModel = python_model(StreamModel)
