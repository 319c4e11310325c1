"""BLIP-2 served on NVIDIA Triton Inference Server: stage logic, checkpoint loading, launcher."""

__version__ = "0.1.0"
