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

from ..io.inputs import InputError, read_input
from ..io.keys import image_key
from ..search.precision import PRECISIONS
from .common import (
    INDEX_BACKENDS,
    POLICIES,
    UsageError,
    check_outputs,
    format_of,
    usage_errors,
)

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
  dedup-index index create my.index --model efficientnet-lite0
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
        "  dedup-index index create my.index --model efficientnet-lite0\n"
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
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="default: the --model's recommended one (0.75 for efficientnet-lite0), else 0.9",
    )
    p.add_argument("--policy", choices=POLICIES, default="reference", help="default: reference")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="arithmetic of the candidate search; decisions are the same in every one "
        "(default: auto, the fastest measured here)",
    )
    p.add_argument(
        "--backend",
        choices=INDEX_BACKENDS,
        default="blocked",
        help="blocked/flat: exact; ivf/hnsw: approximate, for very large indexes "
        "(default: blocked)",
    )
    p.add_argument("--device", default=None, help="device to load --model on (default: auto)")
    p.add_argument(
        "--verify",
        choices=("none", "geometric"),
        default="none",
        help="geometric: a verifying index, storing only pairs confirmed as copies "
        "(perceptual hash, else SIFT + RANSAC, against the indexed images loaded again "
        "from their paths); --threshold then defaults to the model's candidate threshold "
        f"({_candidate_help()}) (default: none)",
    )
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
        p.add_argument(
            "--device",
            default=None,
            help="cpu, cuda, cuda:1...: where the model and the index's search run (default: "
            "the model's device, cuda if any; a .npy input is searched on the CPU)",
        )
        p.add_argument(
            "--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on the CPU"
        )
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
            p.add_argument(
                "--verify",
                choices=("none", "geometric"),
                default=None,
                help="geometric: keep only candidate pairs confirmed as copies; indexed "
                "images are loaded again from their keys under --image-root (or this "
                "folder), and pairs with one that is gone count as not verified (default: "
                "what the index records; an empty index takes this add's)",
            )
            p.add_argument(
                "--workers",
                type=int,
                default=None,
                help="with --verify: processes that decode and extract features "
                "(default: min(CPUs - 1, 4); 0: in this process)",
            )
        p.set_defaults(func=func)

    p = action(
        "stats",
        "print the index's counts and settings as JSON, after checking its keys, pairs "
        "and state files against their SHA-256 (rows are checked when read, and by "
        "'index verify')",
        "  dedup-index index stats my.index\n",
    )
    p.set_defaults(func=stats)

    p = action(
        "compact",
        "merge the files of every add and retrain the FAISS index's coarse quantizer "
        "(nlist grown to the row count) in bounded memory; one atomic commit, decisions "
        "unchanged",
        "  dedup-index index compact my.index\n",
    )
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: from the rows)")
    p.set_defaults(func=compact)
    p = action(
        "verify",
        "check every file of the index against its recorded SHA-256 (exit 1 if damaged)",
        "  dedup-index index verify my.index\n",
    )
    p.set_defaults(func=verify_files)


def _candidate_help() -> str:
    from .run import candidate_help

    return candidate_help()


def compact(args: argparse.Namespace) -> int:
    if args.nlist is not None and args.nlist < 1:
        raise UsageError(f"--nlist must be an integer >= 1, got {args.nlist}")
    from ..progress import progress

    with _open(args.path, "a") as index, progress(len(index), "compact", unit="row") as bar:
        # advanced as each FAISS segment is written (the rows and k-means come first)
        stats = index.compact(nlist=args.nlist, progress=lambda done, _: bar.update(done - bar.n))
    print(json.dumps(stats, indent=2))
    return 0


def verify_files(args: argparse.Namespace) -> int:
    with _open(args.path, "r") as index:
        print(json.dumps(index.verify()))
    return 0


# ---------------------------------------------------------------------------- commands
def create(args: argparse.Namespace) -> int:
    from ..encode.cache import model_identity
    from ..index import DedupIndex

    path = Path(args.path)
    if (path / "manifest.json").exists():
        raise UsageError(f"{path} already holds a dedup index; add to it with 'index add'")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder")
    if args.dim is None and args.model is None:
        raise UsageError("give --dim or --model (the model's embedding dimension is used)")
    dim = args.dim
    threshold = args.threshold
    if threshold is None:
        from ..encode.models import candidate_threshold, recommended_threshold

        threshold = recommended_threshold(args.model)[0]
        if args.verify != "none":  # candidates for verification: the model's own cut
            threshold = candidate_threshold(args.model, threshold)[0]
    if dim is None:  # the model says (loading it also proves it can be loaded)
        dim = _encoder(args.model, args.device, 1).dim
    with usage_errors():
        index = DedupIndex.create(
            path,
            dim,
            threshold,
            policy=args.policy,
            backend=args.backend,
            model_name=None if args.model is None else model_identity(args.model),
            precision=args.precision,
            verify=args.verify,
        )
    with index:
        print(json.dumps(index.stats()))
    return 0


def add(args: argparse.Namespace) -> int:
    from ..index import IndexError_

    check_outputs([args.input, args.path], {"--out": args.out})
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be an integer >= 0, got {args.workers}")
    on_duplicate_key = "skip" if args.skip_existing else "error"
    index = _open(args.path, "a", args.device)
    with index, usage_errors(IndexError_):
        if _is_npy(args.input):
            if "geometric" in (args.verify, index.verify_mode):
                why = (
                    f"the index at {args.path} verifies its pairs"
                    if index.verify_mode != "none"
                    else "--verify geometric"
                )
                raise UsageError(f"verification needs images, not a .npy of embeddings ({why})")
            keys, embeddings = _read_npy(args, index)
            result = index.add(
                embeddings, keys, on_duplicate_key=on_duplicate_key, verify=args.verify
            )
        else:
            values, root, keys = _read_images(args)
            encoder = _encoder(_model_of(args, index), args.device, args.batch_size)
            _search_on_model_device(index, encoder, args.device)
            result = index.add_images(
                values,
                encoder=encoder,
                image_root=root,
                keys=keys,
                on_duplicate_key=on_duplicate_key,
                on_error="skip",
                batch_size=args.batch_size,
                verify=args.verify,
                verify_options={"num_workers": args.workers},
            )
            _report_failures(result.failures, len(values))
            if result.failures and not result.keys:
                raise UsageError(
                    f"none of the {len(values)} images of {args.input} could be loaded"
                )
        total = index.stats()
    rows = result.rows()  # decisions, then every image that did not load (with its error)
    for row in rows:  # the decisions, one JSON line per added row
        print(json.dumps(row))
    if args.out:
        _write_rows(rows, args.out)
        print(f"wrote {len(rows)} rows: {args.out}")
    if result.verification is not None:
        print(f"verification: {result.verification.summary()}")
    skipped = f", {len(result.skipped)} already indexed (skipped)" if result.skipped else ""
    failed = f", {len(result.failures)} failed to load" if result.failures else ""
    print(
        f"added {len(result.keys)} rows: {int(result.kept.sum())} kept, {result.n_removed} "
        f"near-duplicates{skipped}{failed}; the index holds {total['rows']} rows "
        f"({total['kept']} kept)"
    )
    return 0


def query(args: argparse.Namespace) -> int:
    check_outputs([args.input, args.path], {"--out": args.out})
    index = _open(args.path, "r", args.device)
    with index:
        if _is_npy(args.input):
            keys, embeddings = _read_npy(args, index)
        else:
            from ..encode.pipeline import embed_images

            values, root, all_keys = _read_images(args)
            encoder = _encoder(_model_of(args, index), args.device, args.batch_size)
            _search_on_model_device(index, encoder, args.device)
            with usage_errors():
                embedded = embed_images(
                    values, encoder, image_root=root, batch_size=args.batch_size
                )
            _report_failures([(all_keys[p], f) for p, f in embedded.failures], len(values))
            keys = [all_keys[p] for p in embedded.positions]
            embeddings = embedded.embeddings
        with usage_errors():
            found = index.query(embeddings)
    long_rows = []
    for key, hits in zip(keys, found, strict=True):
        print(
            json.dumps(
                {
                    "query": key,
                    "neighbours": [{"key": k, "similarity": min(s, 1.0)} for k, s in hits],
                }
            )
        )
        long_rows += [{"query": key, "key": k, "similarity": min(s, 1.0)} for k, s in hits]
    if args.out:
        _write_rows(long_rows, args.out, columns=("query", "key", "similarity"))
        logger.info("wrote %d neighbour rows to %s", len(long_rows), args.out)
    return 0


def stats(args: argparse.Namespace) -> int:
    """Counts and settings as JSON, after checking the small files against their SHA-256
    (a damaged keys file, pair part or state exits 1 naming it); rows files are checked
    block by block when read, and every file by ``index verify``."""
    with _open(args.path, "r") as index:
        checked = index.verify(full=False)
        out = index.stats()
        out["checked"] = {
            **checked,
            "what": "keys, pairs, state and block-checksum files: SHA-256 verified now",
            "rows": "row blocks are verified when read (by a query or add), and every "
            "file by 'dedup-index index verify'",
        }
        print(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------------------- helpers
def _open(path: str, mode: str, device: str | None = None):
    """Open the index, searching on ``device`` (``--device``); a folder that is not one,
    or a bad device, is a usage error (exit 2)."""
    from ..index import DedupIndex, IndexCorruptError, IndexError_, IndexLockedError

    if not Path(path).exists():
        raise UsageError(f"no index at {path}; create one with 'dedup-index index create'")
    from ..validation import resolve_device

    with usage_errors():  # once, here: open() finds it resolved (no second warning)
        device = resolve_device(device, what="searching the index")
    try:
        return DedupIndex.open(path, mode, device=device)
    except (IndexLockedError, IndexCorruptError):
        raise
    except IndexError_ as exc:
        raise UsageError(str(exc)) from None


def _search_on_model_device(index: Any, encoder: Any, device: str | None) -> None:
    """Without ``--device`` the index searches where the model runs (cuda if any), as
    ``run`` does: the encoder's device, resolved already (no second warning)."""
    if device is None and getattr(encoder, "device", None) is not None:
        index.device = str(encoder.device)


def _encoder(model: str, device: str | None, batch_size: int | None):
    from ..encode import load_encoder

    with usage_errors():
        return load_encoder(model, device=device, batch_size=batch_size)


def _is_npy(path: str) -> bool:
    return Path(path).suffix.lower() == ".npy"


def _read_npy(args: argparse.Namespace, index: Any):
    """Keys and rows of a ``.npy`` of embeddings (keys from ``--keys``, else
    ``<file stem>:<row>``)."""
    import numpy as np

    source = Path(args.input)
    if not source.is_file():
        raise UsageError(f"input {str(source)!r} does not exist")
    try:
        embeddings = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read embeddings from {source}: {exc}") from None
    if embeddings.ndim != 2 or embeddings.shape[1] != index.dim:
        raise UsageError(
            f"{source} holds an array of shape {embeddings.shape}; the index needs (N, {index.dim})"
        )
    if args.keys:
        keys = _read_keys(args.keys, len(embeddings))
    else:
        keys = [f"{source.stem}:{k}" for k in range(len(embeddings))]
    return keys, embeddings


def _read_images(args: argparse.Namespace):
    """The input's image values, the folder they resolve against, and their keys.

    A folder's images are named by the folder as given joined with their path in it
    (``week1/a.jpg``), so two folders never share a key; a table's by its values as
    they are (:func:`~dedup_index.io.keys.image_key`).
    """
    if args.keys:
        raise UsageError("--keys goes with a .npy of embeddings; images are keyed by path")
    with usage_errors(InputError):
        table = read_input(args.input, args.image_key, args.image_root)
    values = table.frame[args.image_key].tolist()
    root = table.image_root
    if table.kind == "folder":
        values = [(Path(args.input) / v).as_posix() for v in values]
        root = None
    return values, root, [image_key(v, p) for p, v in enumerate(values)]


def _model_of(args: argparse.Namespace, index: Any) -> str:
    """The model to embed with: ``--model`` or the index's, and they must agree."""
    from ..encode.cache import model_identity

    if args.model is None and index.model_name is None:
        raise UsageError(f"the index at {args.path} records no model: pass --model")
    if args.model is not None and index.model_name not in (None, model_identity(args.model)):
        raise UsageError(
            f"the index at {args.path} holds embeddings of {index.model_name!r}; "
            f"--model {args.model!r} would not be comparable"
        )
    return args.model or index.model_name


def _report_failures(failures: list, total: int) -> None:
    for key, failure in failures[:5]:
        logger.warning("%s failed to load: %s", key, failure)
    if failures:
        logger.warning("%d of %d images failed to load and were left out", len(failures), total)


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

    from ..io.tables import write_table

    frame = pd.DataFrame(rows, columns=list(columns) if columns else None)
    write_table(frame, path, format_of(path, "jsonl"))
