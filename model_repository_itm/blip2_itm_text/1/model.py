from blip2_triton.triton_model import RetrievalTextModel, python_model

TritonPythonModel = python_model(RetrievalTextModel)
