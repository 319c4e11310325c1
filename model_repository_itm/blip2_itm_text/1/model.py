from blip2_triton.serving.models import RetrievalTextModel, python_model

TritonPythonModel = python_model(RetrievalTextModel)
