from blip2_triton.triton_model import LanguageModel, python_model

TritonPythonModel = python_model(LanguageModel)
