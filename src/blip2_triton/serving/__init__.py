"""Triton glue: request tensors (`tensors`), LLM control messages (`control`), stream buffers (`streams`), custom
metrics (`metrics`) and the Python-backend models (`models`). Only `models` touches Triton's API, through the
`pb_utils` module it is handed; nothing here imports torch at module level, so weightless models stay small."""

from .tensors import CONTROL_DTYPES, LLM_INPUTS

__all__ = ["CONTROL_DTYPES", "LLM_INPUTS"]
