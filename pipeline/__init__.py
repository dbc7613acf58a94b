"""Compile and deploy LLMs with TensorRT-LLM: fetch, quantize, build engines, serve with Triton,
benchmark, and track every run in MLflow. Entry point: ``python -m pipeline``."""

__version__ = "0.1.0"
