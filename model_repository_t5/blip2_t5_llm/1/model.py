from blip2_triton.serving.models import LanguageModel, python_model

TritonPythonModel = python_model(LanguageModel)
