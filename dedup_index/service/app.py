"""The query service: an HTTP front of one :class:`~dedup_index.index.DedupIndex`.

Built on FastAPI (request parsing, errors, OpenAPI docs at ``/docs``) and served by
uvicorn (``dedup-index serve INDEX``).  Endpoints:

- ``POST /query``: JSON ``{"embeddings": [[...], ...]}``, or ``multipart/form-data``
  image files (field ``files``) when the index records a model ->
  ``{"results": [[{"key": ..., "similarity": ...}, ...], ...]}``, the answers of
  :meth:`DedupIndex.query <dedup_index.index.DedupIndex.query>`, one list per row.
- ``POST /add``: JSON ``{"embeddings": [...], "keys": [...], "on_duplicate_key":
  "error"|"skip"}`` or image files (keys: form fields ``keys``, else each image's
  SHA-256) -> the decisions of each row.  The index is committed (durable) before the
  answer is sent.
- ``GET /stats``, ``GET /health``.

One writer at a time: the service holds the index's writer lock (a second writer, the
CLI or another service, is refused), and adds within the service run one after another.
Queries run in a thread pool, concurrently with each other and with an add: each reads
one committed generation (the index's snapshot views), so an answer never mixes two.
A ``read_only`` service takes no lock and moves to each newer generation another
process commits.

Requests are checked before any work: body size (413), content type (415), JSON shape,
row count, dimension and finite values (422), the API key of writes (401, header
``X-API-Key``, compared in constant time).
"""

import contextlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..index import DedupIndex, IndexError_

logger = logging.getLogger(__name__)

#: Rows per request, and bytes per request body, unless configured otherwise.
MAX_ROWS = 1024
MAX_BODY_BYTES = 64 << 20
API_KEY_HEADER = "X-API-Key"


@dataclass
class ServiceConfig:
    """What :func:`create_app` serves and how strictly.

    ``api_key``: writes (``/add``) need it in the ``X-API-Key`` header (None: no key).
    ``encoder``: an encoder object, or ``encoder_factory`` to load one at the first image
    request (images need the index's model).  ``read_only``: no ``/add`` and no lock.
    """

    index_path: str | os.PathLike
    api_key: str | None = None
    read_only: bool = False
    max_rows: int = MAX_ROWS
    max_body_bytes: int = MAX_BODY_BYTES
    encoder: Any = None
    encoder_factory: Callable[[], Any] | None = None


class _Service:
    """The index and the locks the endpoints share."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.path = Path(config.index_path)
        mode = "r" if config.read_only else "a"
        self.index = DedupIndex.open(self.path, mode=mode)
        self.write_lock = threading.Lock()
        self.refresh_lock = threading.Lock()
        self.encoder_lock = threading.Lock()
        self._manifest_stamp = self._stamp()

    def close(self) -> None:
        self.index.close()

    def _stamp(self):
        st = os.stat(self.path / "manifest.json")
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def current(self) -> DedupIndex:
        """The index, moved to the newest committed generation first when another process
        writes it (read-only service)."""
        if self.config.read_only:
            stamp = self._stamp()
            if stamp != self._manifest_stamp:
                with self.refresh_lock:
                    if stamp != self._manifest_stamp:
                        self.index.refresh()
                        self._manifest_stamp = stamp
        return self.index

    def encoder(self):
        if self.config.encoder is None:
            with self.encoder_lock:
                if self.config.encoder is None and self.config.encoder_factory is not None:
                    self.config.encoder = self.config.encoder_factory()
        return self.config.encoder


def create_app(config: ServiceConfig):
    """The FastAPI application serving ``config.index_path`` (opened now: a locked or
    damaged index fails here, not at the first request)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    service = _Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # the writer lock goes with the server

    app = FastAPI(
        title="dedup-index",
        description="Near-duplicate queries and adds against a persistent dedup index.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(IndexError_)
    async def _index_error(request: Request, exc: IndexError_) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    async def body_of(request: Request) -> tuple[str, Any]:
        """``("json", object)`` or ``("files", [(name, bytes)], form)``, checked."""
        length = request.headers.get("content-length")
        if length is None:
            raise HTTPException(411, "send a Content-Length header")
        if not length.isdigit() or int(length) > config.max_body_bytes:
            raise HTTPException(
                413, f"request body over the limit of {config.max_body_bytes} bytes"
            )
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            raw = await request.body()
            if len(raw) > config.max_body_bytes:
                raise HTTPException(413, "request body over the limit")
            try:
                return "json", json.loads(raw)
            except ValueError as err:
                raise HTTPException(422, f"the body is not valid JSON: {err}") from None
        if kind == "multipart/form-data":
            form = await request.form(max_files=config.max_rows, max_fields=config.max_rows + 8)
            files = []
            for upload in form.getlist("files"):
                if isinstance(upload, str):
                    raise HTTPException(422, "field 'files' must hold uploaded files")
                files.append((upload.filename or "", await upload.read()))
            if not files:
                raise HTTPException(422, "no image files: send them in the field 'files'")
            return "files", (files, form)
        raise HTTPException(
            415,
            f"content type {kind or '(none)'!r} not accepted: send application/json "
            "(embeddings) or multipart/form-data (image files)",
        )

    def rows_of(payload: Any, dim: int) -> np.ndarray:
        if not isinstance(payload, dict) or "embeddings" not in payload:
            raise HTTPException(422, 'the JSON body must be an object with "embeddings"')
        try:
            arr = np.asarray(payload["embeddings"], dtype=np.float32)
        except (ValueError, TypeError):
            raise HTTPException(
                422, '"embeddings" must be a list of rows of numbers, all of one length'
            ) from None
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise HTTPException(422, '"embeddings" must be a non-empty list of rows')
        check_count(arr.shape[0])
        if arr.shape[1] != dim:
            raise HTTPException(
                422, f"the index holds {dim}-dimensional embeddings; got rows of {arr.shape[1]}"
            )
        if not np.isfinite(arr).all():
            raise HTTPException(422, '"embeddings" hold NaN or infinite values')
        return arr

    def check_count(n: int) -> None:
        if n > config.max_rows:
            raise HTTPException(413, f"{n} rows in one request; the limit is {config.max_rows}")

    def embed(files: list[tuple[str, bytes]]):
        """Image bytes -> embeddings through the one embedding path."""
        from ..encode.pipeline import embed_images

        check_count(len(files))
        index = service.index
        encoder = service.encoder()
        if encoder is None:
            raise HTTPException(
                422,
                "this service has no image model (the index records "
                f"{index.model_name!r}); send embeddings as JSON",
            )
        embedded = embed_images([data for _, data in files], encoder, progress=False)
        if embedded.failures:
            shown = "; ".join(f"{files[p][0] or f'file {p}'}: {f}" for p, f in embedded.failures)
            raise HTTPException(422, f"{len(embedded.failures)} file(s) are not images: {shown}")
        return embedded.embeddings

    def check_key(request: Request) -> None:
        if config.read_only:
            raise HTTPException(403, "this service is read-only")
        if config.api_key is not None:
            given = request.headers.get(API_KEY_HEADER, "")
            if not hmac.compare_digest(given.encode(), config.api_key.encode()):
                raise HTTPException(401, f"writes need the service's key in {API_KEY_HEADER}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        index = service.current()
        return {"status": "ok", "rows": len(index), "generation": index.generation}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return service.current().stats()

    @app.post("/query")
    async def query(request: Request) -> dict[str, Any]:
        kind, payload = await body_of(request)
        index = service.current()

        def run():
            q = rows_of(payload, index.dim) if kind == "json" else embed(payload[0])
            found = index.query(q)
            return [[{"key": k, "similarity": s} for k, s in hits] for hits in found]

        return {"results": await run_in_threadpool(run)}

    @app.post("/add")
    async def add(request: Request) -> dict[str, Any]:
        check_key(request)
        kind, payload = await body_of(request)
        index = service.index
        if kind == "json":
            keys = payload.get("keys") if isinstance(payload, dict) else None
            on_duplicate_key = (
                payload.get("on_duplicate_key", "error") if isinstance(payload, dict) else "error"
            )
        else:
            files, form = payload
            keys = form.getlist("keys") or None
            on_duplicate_key = form.get("on_duplicate_key") or "error"
        if on_duplicate_key not in ("error", "skip"):
            raise HTTPException(422, '"on_duplicate_key" must be "error" or "skip"')
        if keys is not None and (
            not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys)
        ):
            raise HTTPException(422, '"keys" must be a list of non-empty strings')

        def run():
            if kind == "json":
                rows = rows_of(payload, index.dim)
                if keys is not None and len(keys) != rows.shape[0]:
                    raise HTTPException(422, f"{len(keys)} keys for {rows.shape[0]} rows")
            else:
                from ..io.keys import image_key

                rows = embed(files)
                given = keys or [image_key(data, p) for p, (_, data) in enumerate(files)]
                if len(given) != rows.shape[0]:
                    raise HTTPException(422, f"{len(given)} keys for {rows.shape[0]} files")
                return add_rows(rows, given)
            return add_rows(rows, keys)

        def add_rows(rows, row_keys):
            with service.write_lock:
                try:
                    result = index.add(rows, row_keys, on_duplicate_key=on_duplicate_key)
                except ValueError as err:
                    raise HTTPException(422, str(err)) from None
                generation, total = index.generation, len(index)
            results = result.rows()
            return {
                "results": results,
                "skipped": result.skipped,
                "generation": generation,
                "rows": total,
            }

        return await run_in_threadpool(run)

    return app


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, **uvicorn_options):
    """Run the service until interrupted (uvicorn, one process; the index is opened
    before the port is bound)."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_options)
