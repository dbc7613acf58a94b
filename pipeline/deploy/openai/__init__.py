"""The OpenAI-compatible HTTP API in front of a served Triton repository (FastAPI + uvicorn)."""
