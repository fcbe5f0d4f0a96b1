"""The FastAPI inference service: ``uvicorn serving.app:app`` or ``python -m serving``."""
