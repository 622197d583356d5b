"""``dedup-index serve INDEX``: the HTTP query service over a persistent index.

A thin layer over :mod:`dedup_index.service` (FastAPI + uvicorn, the optional extra
``serve``).  The index is opened before the port is bound, so a missing, locked or
damaged index is reported at once (exit 2 or 1) rather than at the first request.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .common import UsageError

DESCRIPTION = """\
Serve a persistent index over HTTP: POST /query (JSON embeddings, or image files when
the index records a model) answers each row's near-duplicates in the index; POST /add
adds rows and answers their decisions (committed before the answer); GET /stats and
GET /health. One writer: the service holds the index's writer lock (--read-only: no
lock, no /add, answers follow what another writer commits). Writes need the key in the
environment variable named by --api-key-env (default DEDUP_INDEX_API_KEY) when it is set.
"""

EXAMPLES = """\
examples:
  dedup-index serve my.index                          # http://127.0.0.1:8000/docs
  DEDUP_INDEX_API_KEY=secret dedup-index serve my.index --port 8080
  curl -s localhost:8000/query -H 'content-type: application/json' \\
       -d '{"embeddings": [[0.1, 0.2, ...]]}'
  curl -s localhost:8000/query -F files=@photo.jpg    # with the index's model
"""


def add_parser(sub: Any, parents: list) -> None:
    p = sub.add_parser(
        "serve",
        parents=parents,
        help="serve a persistent index over HTTP (query, add, stats)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="INDEX", help="the index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="queries only: no writer lock, no /add",
    )
    p.add_argument(
        "--api-key-env",
        default="DEDUP_INDEX_API_KEY",
        help="environment variable holding the key /add needs in X-API-Key "
        "(default: DEDUP_INDEX_API_KEY; unset: no key)",
    )
    p.add_argument("--max-rows", type=int, default=1024, help="rows per request (default 1024)")
    p.add_argument(
        "--max-body-mb", type=float, default=64.0, help="MiB per request body (default 64)"
    )
    p.add_argument("--model", default=None, help="image model (default: the index's)")
    p.add_argument("--device", default=None, help="device for the image model (default: auto)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.path, "manifest.json").exists():
        raise UsageError(f"no index at {args.path}; create one with 'dedup-index index create'")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_rows < 1 or args.max_body_mb <= 0:
        raise UsageError("--max-rows and --max-body-mb must be positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"the service needs FastAPI and uvicorn ({exc}): pip install 'dedup-index[serve]'"
        ) from None
    from ..index import IndexLockedError
    from ..service import ServiceConfig, serve

    try:
        recorded = json.loads(Path(args.path, "manifest.json").read_text()).get("model_name")
    except (OSError, ValueError, AttributeError):
        recorded = None  # opening the index names the problem
    model = args.model or recorded

    def load():
        from ..encode import load_encoder

        return load_encoder(model, device=args.device)

    config = ServiceConfig(
        args.path,
        api_key=os.environ.get(args.api_key_env) or None,
        read_only=args.read_only,
        max_rows=args.max_rows,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        encoder_factory=load if model else None,
    )
    try:
        serve(config, host=args.host, port=args.port)
    except IndexLockedError as exc:
        raise UsageError(f"{exc}; or serve it with --read-only") from None
    return 0
