"""`danlu serve`: a run behind a web page and an HTTP API (FastAPI on uvicorn), micro-batched on the device.

    from danlu.serve import create_app, serve
    app = create_app("runs/lenet")          # ASGI app: GET /, POST /v1/classify, GET /v1/model, GET /healthz
    serve("runs/lenet", port=8000)           # on 127.0.0.1 until Ctrl-C
"""
from __future__ import annotations

_LAZY = {"create_app": "danlu.serve.app", "serve": "danlu.serve.app", "FaceService": "danlu.serve.faces"}
__all__ = sorted(_LAZY)  # nothing is imported until used: `danlu --help` loads no web framework


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        from danlu.errors import require  # the extra's pip command where FastAPI or uvicorn is missing

        require("fastapi", "serve", "danlu serve")
        require("uvicorn", "serve", "danlu serve")

        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module '{__name__}' has no attribute {name!r}")
