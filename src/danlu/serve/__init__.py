"""`danlu serve`: a run behind a web page and an HTTP API (FastAPI on uvicorn), micro-batched on the device.

    from danlu.serve import create_app, serve
    app = create_app("runs/lenet")          # ASGI app: GET /, POST /v1/classify, GET /v1/model, GET /healthz
    serve("runs/lenet", port=8000)           # on 127.0.0.1 until Ctrl-C
"""
from danlu.serve.app import create_app, serve
from danlu.serve.faces import FaceService

__all__ = ["create_app", "serve", "FaceService"]
