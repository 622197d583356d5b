"""An HTTP query service over a persistent index (FastAPI + uvicorn, optional extra
``serve``): ``dedup-index serve INDEX``.  See :mod:`.app`."""

from .app import MAX_BODY_BYTES, MAX_ROWS, ServiceConfig, create_app, serve

__all__ = ["MAX_BODY_BYTES", "MAX_ROWS", "ServiceConfig", "create_app", "serve"]
