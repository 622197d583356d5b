"""``dedup-index index create|add|query|stats PATH``: the persistent index from the shell.

A thin layer over :class:`~dedup_index.index.DedupIndex`: ``create`` makes an empty index
(dimension from ``--dim`` or the ``--model``), ``add`` adds images (a folder, table or list
of paths, embedded with the index's model) or a ``.npy`` of embeddings, ``query`` prints
the indexed near-duplicates of each input row as JSON lines without changing the index,
and ``stats`` prints the index's counts and settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from ._common import (
    INDEX_BACKENDS,
    POLICIES,
    UsageError,
    check_outputs,
    check_positive,
    check_threshold_arg,
    format_of,
)
from .inputs import read_input

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Persistent index: create it once, add new images as they come, query it, read its stats.
'create' makes an empty index (dimension from --dim or --model); 'add' adds images (a folder,
table or list of paths, embedded with the index's model) or a .npy of embeddings, and prints
the decisions (kept, or the key it duplicates); 'query' prints each input row's indexed
near-duplicates as JSON lines without changing the index; 'stats' prints counts and
settings as JSON. Decisions equal one-shot dedup of everything added, in order.
"""

EXAMPLES = """\
examples:
  dedup-index index create my.index --model efficientnet-lite0 --threshold 0.85
  dedup-index index add my.index photos/week1/            # images, embedded with the model
  dedup-index index add my.index photos/week2/ --out week2.jsonl   # per-row decisions
  dedup-index index query my.index new_photos/            # JSON lines: query -> neighbours
  dedup-index index stats my.index

  # embeddings you already have (float rows, one per key):
  dedup-index index create vec.index --dim 512 --threshold 0.9
  dedup-index index add vec.index week1.npy --keys week1_keys.txt
"""


def add_parser(sub: Any, parents: list) -> None:
    top = sub.add_parser(
        "index",
        parents=parents,
        help="a persistent index: create, add new images next week, query, stats",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = top.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, helptext: str, example: str) -> argparse.ArgumentParser:
        p = actions.add_parser(
            name,
            parents=parents,
            help=helptext,
            description=helptext,
            epilog="examples:\n" + example,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("path", metavar="PATH", help="the index folder")
        return p

    p = action(
        "create",
        "create an empty index",
        "  dedup-index index create my.index --model efficientnet-lite0 --threshold 0.85\n"
        "  dedup-index index create vec.index --dim 512 --threshold 0.9 --backend hnsw\n",
    )
    p.add_argument(
        "--dim", type=int, default=None, help="embedding dimension (default: the --model's)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="the model whose embeddings the index holds (recorded; gives --dim)",
    )
    p.add_argument("--threshold", type=float, default=0.9, help="default: %(default)s")
    p.add_argument("--policy", choices=POLICIES, default="reference", help="default: reference")
    p.add_argument(
        "--backend",
        choices=INDEX_BACKENDS,
        default="blocked",
        help="blocked/flat: exact; ivf/hnsw: approximate, for very large indexes "
        "(default: blocked)",
    )
    p.add_argument("--device", default=None, help="device to load --model on (default: auto)")
    p.set_defaults(func=create)

    for name, helptext, example, func in (
        (
            "add",
            "add images (or a .npy of embeddings) to the index; prints the decisions",
            "  dedup-index index add my.index photos/week2/ --out week2.jsonl\n"
            "  dedup-index index add vec.index week2.npy --keys week2_keys.txt\n",
            add,
        ),
        (
            "query",
            "print each input row's near-duplicates in the index (JSON lines); read-only",
            "  dedup-index index query my.index new_photos/\n"
            "  dedup-index index query vec.index probe.npy --out hits.parquet\n",
            query,
        ),
    ):
        p = action(name, helptext, example)
        p.add_argument(
            "input",
            metavar="INPUT",
            help="folder, table or text file of image paths, or a .npy of embeddings",
        )
        p.add_argument("--keys", default=None, help="with a .npy: text file of keys, one a line")
        p.add_argument("--image-key", default="image", help="image column (default: image)")
        p.add_argument("--image-root", default=None, help="folder relative paths resolve against")
        p.add_argument(
            "--model", default=None, help="image model (default: the one the index records)"
        )
        p.add_argument("--device", default=None, help="cpu, cuda... (default: auto)")
        p.add_argument("--batch-size", type=int, default=32, help="default: 32")
        p.add_argument(
            "--out",
            default=None,
            help="also write the rows as a table (.jsonl/.json/.csv/.parquet)",
        )
        if name == "add":
            p.add_argument(
                "--skip-existing",
                action="store_true",
                help="leave out keys already in the index (default: refuse them)",
            )
        p.set_defaults(func=func)

    p = action(
        "stats",
        "print the index's counts and settings as JSON",
        "  dedup-index index stats my.index\n",
    )
    p.set_defaults(func=stats)


# ---------------------------------------------------------------------------- commands
def create(args: argparse.Namespace) -> int:
    from ..index import DedupIndex

    check_threshold_arg(args.threshold)
    check_positive(args.dim, "--dim")
    path = Path(args.path)
    if (path / "manifest.json").exists():
        raise UsageError(f"{path} already holds a dedup index; add to it with 'index add'")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder")
    if args.dim is None and args.model is None:
        raise UsageError("give --dim or --model (the model's embedding dimension is used)")
    dim = args.dim
    if dim is None:  # the model says (loading it also proves it can be loaded)
        dim = _encoder(args.model, args.device, 1).dim
    with DedupIndex.create(
        path,
        dim,
        args.threshold,
        policy=args.policy,
        backend=args.backend,
        model_name=args.model,
    ) as index:
        print(json.dumps(index.stats()))
    return 0


def add(args: argparse.Namespace) -> int:
    from ..index import IndexError_

    check_positive(args.batch_size, "--batch-size")
    check_outputs([args.input, args.path], {"--out": args.out})
    index = _open(args.path, "a")
    with index:
        keys, embeddings, failures = _rows(args, index, skip_existing=args.skip_existing)
        try:
            result = index.add(
                embeddings, keys, on_duplicate_key="skip" if args.skip_existing else "error"
            )
        except IndexError_ as exc:
            raise UsageError(str(exc)) from None
        rows = [
            {
                "key": k,
                "kept": bool(kept),
                "duplicate_of": dup,
                "similarity": None if dup is None else float(s),
                "max_similarity": float(m),
            }
            for k, kept, dup, s, m in zip(
                result.keys,
                result.kept,
                result.duplicate_of,
                result.similarity,
                result.max_similarity,
                strict=True,
            )
        ]
        total = index.stats()
    if args.out:
        _write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows: {args.out}")
    skipped = f", {len(result.skipped)} already indexed (skipped)" if result.skipped else ""
    failed = f", {len(failures)} failed to load" if failures else ""
    print(
        f"added {len(result.keys)} rows: {int(result.kept.sum())} kept, {result.n_removed} "
        f"near-duplicates{skipped}{failed}; the index holds {total['rows']} rows "
        f"({total['kept']} kept)"
    )
    return 0


def query(args: argparse.Namespace) -> int:
    check_positive(args.batch_size, "--batch-size")
    check_outputs([args.input, args.path], {"--out": args.out})
    index = _open(args.path, "r")
    with index:
        keys, embeddings, failures = _rows(args, index, skip_existing=False)
        found = index.query(embeddings)
    long_rows = []
    for key, hits in zip(keys, found, strict=True):
        print(
            json.dumps({"query": key, "neighbours": [{"key": k, "similarity": s} for k, s in hits]})
        )
        long_rows += [{"query": key, "key": k, "similarity": s} for k, s in hits]
    if args.out:
        _write_rows(long_rows, args.out, columns=("query", "key", "similarity"))
        logger.info("wrote %d neighbour rows to %s", len(long_rows), args.out)
    return 0


def stats(args: argparse.Namespace) -> int:
    with _open(args.path, "r") as index:
        print(json.dumps(index.stats(), indent=2))
    return 0


# ---------------------------------------------------------------------------- helpers
def _open(path: str, mode: str):
    """Open the index; a folder that is not one is a usage error (exit 2)."""
    from ..index import DedupIndex, IndexCorruptError, IndexError_, IndexLockedError

    if not Path(path).exists():
        raise UsageError(f"no index at {path}; create one with 'dedup-index index create'")
    try:
        return DedupIndex.open(path, mode)
    except (IndexLockedError, IndexCorruptError):
        raise
    except IndexError_ as exc:
        raise UsageError(str(exc)) from None


def _encoder(model: str, device: str | None, batch_size: int):
    from ..encode import load_encoder
    from ..errors import ModelLoadError

    try:
        return load_encoder(model, device=device, batch_size=batch_size)
    except ModelLoadError as exc:
        raise UsageError(str(exc)) from None


def _rows(args: argparse.Namespace, index: Any, *, skip_existing: bool):
    """Keys and unit embeddings of the input rows (``.npy`` or images), and load failures."""
    import numpy as np

    source = Path(args.input)
    if source.suffix.lower() == ".npy":
        if not source.is_file():
            raise UsageError(f"input {str(source)!r} does not exist")
        try:
            embeddings = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read embeddings from {source}: {exc}") from None
        if embeddings.ndim != 2 or embeddings.shape[1] != index.dim:
            raise UsageError(
                f"{source} holds an array of shape {embeddings.shape}; the index needs "
                f"(N, {index.dim})"
            )
        keys = _read_keys(args.keys, len(embeddings)) if args.keys else None
        if keys is None:
            keys = [f"{source.stem}:{k}" for k in range(len(embeddings))]
        if skip_existing:
            known = set(index.keys())
            mask = np.array([k not in known for k in keys], dtype=bool)
            keys, embeddings = [k for k in keys if k not in known], embeddings[mask]
        return keys, embeddings, []
    if args.keys:
        raise UsageError("--keys goes with a .npy of embeddings; images are keyed by path")
    model = args.model or index.model_name
    if model is None:
        raise UsageError(f"the index at {args.path} records no model: pass --model")
    if args.model and index.model_name not in (None, args.model):
        raise UsageError(
            f"the index at {args.path} holds embeddings of {index.model_name!r}; "
            f"--model {args.model!r} would not be comparable"
        )
    table = read_input(source, args.image_key, args.image_root)
    values = table.frame[args.image_key].tolist()
    if table.kind == "folder":
        keys = [(source / v).as_posix() for v in values]
    else:  # the operator's keys (index_path=...): the path as given, else a content hash
        from ..operator.filter import _index_key

        keys = [_index_key(v, p) for p, v in enumerate(values)]
    if len(set(keys)) != len(keys):
        raise UsageError(f"{source} lists some images more than once")
    if skip_existing:
        known = set(index.keys())
        values = [v for v, k in zip(values, keys, strict=True) if k not in known]
        keys = [k for k in keys if k not in known]
    elif index.mode == "a":
        clash = [k for k in keys if k in set(index.keys())]
        if clash:
            raise UsageError(
                f"{len(clash)} image(s) are already in the index, e.g. {clash[:3]}; "
                "pass --skip-existing to leave them out"
            )
    encoder = _encoder(model, args.device, args.batch_size)
    embeddings, valid, failures = embed_values(values, encoder, table.image_root, args.batch_size)
    if embeddings.shape[1] != index.dim:
        raise UsageError(
            f"model {model!r} gives {embeddings.shape[1]}-dimensional embeddings; the index "
            f"at {args.path} holds {index.dim}-dimensional ones"
        )
    for pos, failure in failures[:5]:
        logger.warning("%s failed to load: %s", keys[pos], failure)
    if failures:
        logger.warning("%d of %d images failed to load and were left out", len(failures), len(keys))
    if not valid and keys:
        raise UsageError(f"none of the {len(keys)} images of {source} could be loaded")
    return [keys[p] for p in valid], embeddings, failures


def embed_values(values: list, encoder: Any, image_root: Any, batch_size: int):
    """Load and embed ``values`` batch by batch: ``(embeddings, valid positions, failures)``."""
    import numpy as np

    from ..io import try_load_image
    from ..progress import progress

    parts, valid, failures = [], [], []
    with progress(len(values), "embedding", unit="img") as bar:
        for start in range(0, len(values), batch_size):
            images = []
            for pos in range(start, min(start + batch_size, len(values))):
                image, failure = try_load_image(values[pos], image_root=image_root)
                if failure is None:
                    images.append(image)
                    valid.append(pos)
                else:
                    failures.append((pos, failure))
            if images:
                parts.append(np.asarray(encoder.encode(images), dtype=np.float32))
            bar.update(min(batch_size, len(values) - start))
    dim = int(getattr(encoder, "dim", 0) or 0)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return embeddings, valid, failures


def _read_keys(path: str, n: int) -> list[str]:
    if not Path(path).is_file():
        raise UsageError(f"--keys {path!r} does not exist")
    keys = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines()]
    keys = [k for k in keys if k]
    if len(keys) != n:
        raise UsageError(f"--keys {path} has {len(keys)} keys for {n} embeddings")
    return keys


def _write_rows(rows: list[dict], path: str | os.PathLike, columns=None) -> None:
    import pandas as pd

    from ..operator.storage import write_table

    frame = pd.DataFrame(rows, columns=list(columns) if columns else None)
    write_table(frame, path, format_of(path, "jsonl"))
