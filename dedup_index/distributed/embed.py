"""``embed_table``: images to an embedding store with Ray Data and encoder actors, resumable.

The rows are cut into *shards* of ``shard_rows`` consecutive rows; shard ``k`` is rows
``[k * shard_rows, (k + 1) * shard_rows)`` whatever the cluster, so its id is fixed by its
row range.  A Ray Data pipeline (``from_items`` over the unfinished shards, then
``map_batches`` with an actor class that loads the encoder once: one actor per GPU with
``num_gpus_per_actor=1``, or CPU actors) loads each shard's images, embeds them and writes
``out_dir/parts/shard-<start>-<stop>.npz`` atomically (temp file + rename): the valid rows'
positions and embeddings, and every load failure with its reason.  A worker that dies
loses only its unfinished shard (Ray Data restarts the actor and retries it); a rerun with
the same ``out_dir`` skips every finished shard.

The shards are read by the workers themselves: values of an in-memory list travel with the
shard; a Parquet manifest is read by row group, a JSONL manifest from the byte offset of
the shard's first line (found by one scan on the driver); a folder is listed on the driver
(relative paths, images loaded relative to it).  Every node must see the manifest, the
images and ``out_dir`` at the same paths (shared storage: NFS, a mounted bucket).

Inside an actor a shard goes through the one embedding path,
:func:`~dedup_index.encode.pipeline.embed_images`, with ``num_workers`` loader processes
decoding and preprocessing the next batches (into pinned memory on a GPU) while the
model runs, so a GPU actor is not starved by one CPU decoding image after image.  Its
device is the one Ray assigned (:func:`actor_device`: the first of ``ray.get_gpu_ids()``,
as the actor's ``CUDA_VISIBLE_DEVICES`` numbers it).  An actor without a GPU never
touches CUDA: ``device="cuda"`` with ``num_gpus_per_actor=0`` is refused up front, since
every such actor would land on GPU 0 of its node, outside Ray's accounting.

At the end the driver appends the parts in row order to an
:class:`~dedup_index.store.EmbeddingStore` at ``out_dir/store`` (keys: the input row
positions, as decimal strings), so row ``k`` of the store is the ``k``-th valid row and
:func:`~dedup_index.distributed.dedup_store` (or any backend) runs on it directly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..encode.runtime import cuda_index, is_cuda
from ..files import atomic_write_bytes
from ..io import DEFAULT_MAX_PIXELS, LoadFailure
from ..progress import progress as progress_bar
from ..store import EmbeddingStore, StoreError
from ..validation import check_positive_int
from . import tiles as tl
from .cluster import cluster_cpus, connect

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
STORE_DIR = "store"
FAILURES_FILE = "failures.jsonl"
#: Default rows per shard: the unit of resumption (and of work of one actor call).
DEFAULT_SHARD_ROWS = 1024


@dataclass(frozen=True)
class EmbedSummary:
    """What :func:`embed_table` did.

    ``store_path``: the :class:`~dedup_index.store.EmbeddingStore` of the valid rows, in
    input order.  ``rows``: input row position of each store row.  ``embedded``: rows
    embedded by this call; ``reused``: valid rows taken from shards finished before;
    ``failures``: ``(row, LoadFailure)`` for every row whose image did not load (also in
    ``out_dir/failures.jsonl``), never dropped silently.
    """

    store_path: Path
    n_rows: int
    rows: np.ndarray
    embedded: int
    reused: int
    failures: list[tuple[int, LoadFailure]]
    shards: int
    shards_computed: int
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def n_valid(self) -> int:
        return int(self.rows.shape[0])

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        return (
            f"{self.n_rows} rows: {self.n_valid} embedded into {self.store_path} "
            f"({self.embedded} now, {self.reused} from finished shards), {self.n_failed} failed "
            f"to load; {self.shards_computed} of {self.shards} shards computed, "
            f"{self.seconds:.1f} s"
        )


# ------------------------------------------------------------------------------ sources


@dataclass
class _Source:
    """Where the values of the rows come from, as a worker needs to know it."""

    kind: str  # "values" | "parquet" | "jsonl"
    n: int
    column: str
    path: str | None = None
    values: list | None = None
    offsets: list[int] | None = None  # jsonl: byte offset of each shard's first row
    image_root: str | None = None
    fingerprint: dict = field(default_factory=dict)


def _resolve_source(
    values_or_manifest: Any, column: str, image_root: Any, shard_rows: int
) -> _Source:
    root = None if image_root is None else str(Path(image_root).resolve())
    obj = values_or_manifest
    if hasattr(obj, "columns") and hasattr(obj, "__getitem__"):  # a DataFrame
        if column not in obj.columns:
            raise KeyError(
                f"image column {column!r} not found; the table has columns "
                f"{list(map(str, obj.columns))}"
            )
        obj = obj[column].tolist()
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).resolve()
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        stat = path.stat()
        if path.is_dir():
            from ..io.inputs import list_images

            values = list_images(path)
            fp = {"folder": str(path), "sha256": _sha256(pickle.dumps(values))}
            return _Source(
                "values",
                len(values),
                column,
                values=values,
                image_root=root or str(path),
                fingerprint=fp,
            )
        fp = {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if column not in pf.schema_arrow.names:
                raise KeyError(
                    f"image column {column!r} not found in {path}; it has {pf.schema_arrow.names}"
                )
            return _Source(
                "parquet",
                pf.metadata.num_rows,
                column,
                path=str(path),
                image_root=root or str(path.parent),
                fingerprint=fp,
            )
        if suffix in (".jsonl", ".ndjson"):
            n, offsets = _jsonl_offsets(path, shard_rows)
            return _Source(
                "jsonl",
                n,
                column,
                path=str(path),
                offsets=offsets,
                image_root=root or str(path.parent),
                fingerprint=fp,
            )
        raise ValueError(
            f"input {path}: expected a folder, a .parquet or a .jsonl manifest, "
            "or a list of values / a DataFrame"
        )
    if isinstance(obj, (bytes, bytearray)) or not isinstance(obj, Sequence):
        try:
            obj = list(obj)
        except TypeError:
            raise TypeError(
                f"values_or_manifest must be a list of image values, a DataFrame, "
                f"a folder or a manifest path; got {type(obj).__name__}"
            ) from None
    values = list(obj)
    return _Source(
        "values",
        len(values),
        column,
        values=values,
        image_root=root,
        fingerprint={"values_sha256": _sha256(pickle.dumps(values))},
    )


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _jsonl_offsets(path: Path, shard_rows: int) -> tuple[int, list[int]]:
    """Rows (non-blank lines) of a JSONL file and the byte offset of each shard's first row."""
    n, offsets, pos = 0, [], 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n % shard_rows == 0:
                    offsets.append(pos)
                n += 1
            pos += len(line)
    return n, offsets


def _read_values(source: _Source, shard: int, start: int, stop: int, payload: bytes) -> list:
    """The values of rows ``[start, stop)``, read where they are (on the worker)."""
    if source.kind == "values":
        return pickle.loads(payload)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(source.path)
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if row < stop and row + size > start:
                groups.append(g)
                first = row if first is None else first
            row += size
        table = pf.read_row_groups(groups, columns=[source.column])
        return table.column(0).slice(start - first, stop - start).to_pylist()
    values = []
    with open(source.path, "rb") as f:
        f.seek(source.offsets[shard])
        while len(values) < stop - start:
            line = f.readline()
            if not line:
                raise ValueError(f"{source.path} ended before row {stop} (it changed?)")
            if line.strip():
                record = json.loads(line)
                values.append(record.get(source.column) if isinstance(record, dict) else None)
    return values


# ------------------------------------------------------------------------------- parts


def _part_path(out_dir: Path, start: int, stop: int) -> Path:
    return out_dir / PARTS_DIR / f"shard-{start:012d}-{stop:012d}.npz"


def _write_part(path: Path, job: str, rows, embeddings, failures) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        header=np.array(json.dumps({"version": tl.FORMAT_VERSION, "job": job})),
        rows=np.asarray(rows, dtype=np.int64),
        embeddings=np.asarray(embeddings, dtype=np.float32),
        fail_rows=np.asarray([r for r, _ in failures], dtype=np.int64),
        fail_reasons=np.asarray([f.reason for _, f in failures], dtype=str),
        fail_messages=np.asarray([f.message for _, f in failures], dtype=str),
    )
    atomic_write_bytes(path, buf.getvalue())


def _read_part(path: Path, job: str, start: int, stop: int) -> dict:
    """A part's arrays, checked; ``ValueError`` naming the file when it is not usable."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            part = {
                k: z[k]
                for k in (
                    "header",
                    "rows",
                    "embeddings",
                    "fail_rows",
                    "fail_reasons",
                    "fail_messages",
                )
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"shard file {path} is unreadable: {err}") from err
    header = json.loads(str(part["header"]))
    if header != {"version": tl.FORMAT_VERSION, "job": job}:
        raise ValueError(f"shard file {path} belongs to another job ({header})")
    covered = np.sort(np.concatenate([part["rows"], part["fail_rows"]]))
    if not np.array_equal(covered, np.arange(start, stop)) or (
        part["embeddings"].shape[0] != part["rows"].shape[0]
    ):
        raise ValueError(f"shard file {path} does not cover rows [{start}, {stop}) exactly")
    return part


def actor_device(requested: str | None, gpu_ids: Sequence[Any], visible: str | None = None) -> str:
    """The device an encoder actor runs on: what was asked for, on what Ray assigned.

    Args:
        requested: the ``device`` given to :func:`embed_table` (None, ``"auto"``,
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"``).
        gpu_ids: ``ray.get_gpu_ids()`` inside the actor (physical ids, ints or strings).
        visible: the actor's ``CUDA_VISIBLE_DEVICES`` (None: not set).

    With GPUs assigned: ``"cpu"`` stays ``"cpu"``; None, ``"auto"`` and ``"cuda"`` are
    the first assigned GPU, ``"cuda:N"`` the ``N``-th assigned one, numbered as this
    process sees them (Ray sets ``CUDA_VISIBLE_DEVICES`` to the assigned ids, so the
    first is ``cuda:0``; where it does not, the physical id).  Without GPUs: None,
    ``"auto"`` and ``"cpu"`` are ``"cpu"``; a CUDA device is a ``ValueError`` (the actor
    would use GPU 0 of its node, shared with every other such actor, unseen by Ray).
    """
    want = "auto" if requested is None else str(requested)
    if want not in ("auto", "cpu") and not is_cuda(want):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {requested!r}")
    if want == "cpu":
        return "cpu"
    ids = [str(g).strip() for g in gpu_ids]
    if not ids:
        if want == "auto":
            return "cpu"
        raise ValueError(
            f"device={requested!r} but Ray gave this encoder actor no GPU: pass "
            "num_gpus_per_actor=1 (one actor per GPU) to embed on GPUs, or device='cpu'"
        )
    shown = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    local = []
    for k, gid in enumerate(ids):
        if shown is None:
            local.append(int(gid) if gid.isdigit() else k)
        else:
            local.append(shown.index(gid) if gid in shown else k)
    index = cuda_index(want) or 0
    if index >= len(local):
        raise ValueError(
            f"device={requested!r} but Ray gave this encoder actor {len(local)} GPU(s): "
            f"cuda:0 to cuda:{len(local) - 1} are its own"
        )
    return f"cuda:{local[index]}"


class _EncoderActor:
    """A Ray Data actor: loads the encoder once, on the device Ray assigned it, then
    embeds whole shards to part files."""

    def __init__(
        self,
        *,
        model_name: str,
        batch_size: int | None,
        device: str | None,
        threads: int | None,
        num_workers: int,
        max_pixels: int | None,
        out_dir: str,
        job: str,
        source: _Source,
    ) -> None:
        import ray

        from ..encode import load_encoder

        device = actor_device(device, ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        options = {} if threads is None else {"threads": threads}
        self.encoder = load_encoder(model_name, device=device, batch_size=batch_size, **options)
        # Batches are cut where one machine cuts them: at the encoder's batch size.
        self.batch_size = self.encoder.batch_size
        self.num_workers = num_workers
        self.max_pixels = max_pixels
        self.out_dir = Path(out_dir)
        self.job = job
        self.source = source

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = {"shard": [], "embedded": [], "failed": [], "skipped": []}
        for k, start, stop, payload in zip(
            batch["shard"], batch["start"], batch["stop"], batch["payload"], strict=True
        ):
            k, start, stop = int(k), int(start), int(stop)
            path = _part_path(self.out_dir, start, stop)
            if path.exists():  # a re-executed task: the shard is already done
                part = _read_part(path, self.job, start, stop)
                done["skipped"].append(True)
            else:
                part = self._embed_shard(k, start, stop, bytes(payload), path)
                done["skipped"].append(False)
            done["shard"].append(k)
            done["embedded"].append(int(part["rows"].shape[0]))
            done["failed"].append(int(part["fail_rows"].shape[0]))
        return {key: np.asarray(v) for key, v in done.items()}

    def _embed_shard(self, k: int, start: int, stop: int, payload: bytes, path: Path) -> dict:
        """One shard through the one embedding path, in this actor's process: the same
        decode, JPEG draft and preprocessing as one machine, and batches cut where one
        machine cuts them (at multiples of ``batch_size`` from row 0), so the same bits."""
        from ..encode.pipeline import embed_images

        values = _read_values(self.source, k, start, stop, payload)
        # A shard may start inside a batch: its head is that batch's tail.
        head = min(stop, -(-start // self.batch_size) * self.batch_size) - start
        rows, parts, failures = [], [], []
        for offset, piece in ((0, values[:head]), (head, values[head:])):
            if not piece:
                continue
            embedded = embed_images(
                piece,
                self.encoder,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                image_root=self.source.image_root,
                max_pixels=self.max_pixels,
                progress=False,
            )
            rows += [start + offset + p for p in embedded.positions]
            failures += [(start + offset + p, f) for p, f in embedded.failures]
            parts.append(embedded.embeddings)
        embeddings = np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)
        _write_part(path, self.job, rows, embeddings, failures)
        return {"rows": np.asarray(rows), "fail_rows": np.asarray([r for r, _ in failures])}


# ---------------------------------------------------------------------------- embed_table


def embed_table(
    values_or_manifest: Any,
    out_dir: str | os.PathLike,
    *,
    model_name: str,
    batch_size: int | None = None,
    column: str = "image",
    image_root: str | os.PathLike | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    num_gpus_per_actor: float | None = 0,
    cpus_per_actor: int | None = None,
    concurrency: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    address: str | None = None,
    progress: bool | None = None,
) -> EmbedSummary:
    """Embed every row's image on a Ray cluster into ``out_dir/store``; resumable.

    Args:
        values_or_manifest: a list of image values (paths, bytes, PIL images, ...), a
            pandas DataFrame (its ``column``), a ``.parquet`` or ``.jsonl`` manifest with an
            image ``column``, or a folder of images.
        out_dir: shared directory for the shards, the store and ``failures.jsonl``.  A
            rerun with the same inputs skips the finished shards; other inputs (another
            model, table or shard size) are refused.
        model_name: what :func:`~dedup_index.encode.load_encoder` loads on every actor (a
            CLIP directory every node sees, a hub id cached on every node, or
            ``"efficientnet-lite0"``).
        batch_size: images per forward pass; None: the encoder's default for the actor's
            device (256 on a GPU, 32 on a CPU; see
            :func:`~dedup_index.encode.runtime.default_batch_size`).
        image_root: relative image paths resolve against it (default: the folder, or the
            manifest's folder).
        shard_rows: rows per shard (unit of resumption and of work).
        num_gpus_per_actor: GPUs per encoder actor (1: one actor per GPU, device cuda);
            None: 1 when the cluster has GPUs and ``device`` is not ``"cpu"``, else 0.
            More than the cluster has is an error at once.
        cpus_per_actor: CPUs per actor: torch threads on a CPU actor, the actor plus its
            loader processes on a GPU actor.  None: 1 on a CPU actor; on a GPU actor the
            cluster's CPUs shared among the actors (one kept for Ray), at most 1 + 16.
        concurrency: number of actors (default: GPUs / num_gpus_per_actor, else CPUs /
            cpus_per_actor, at most the number of shards to do).
        device: the encoder's device: None (a GPU actor's assigned GPU, else the CPU),
            ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the N-th of the actor's own GPUs; see
            :func:`actor_device`).  A CUDA device without ``num_gpus_per_actor`` is
            refused: actors without GPUs would all share GPU 0.
        num_workers: loader processes per actor
            (:func:`~dedup_index.encode.pipeline.embed_images`); None: ``cpus_per_actor
            - 1`` on a GPU actor, 0 on a CPU actor (its CPUs run the model).  Results do
            not depend on it.
        address: the Ray cluster (see :func:`~dedup_index.distributed.connect`).
        progress: an images/s progress bar (None: when stderr is a terminal).
    """
    start_time = time.perf_counter()
    shard_rows = check_positive_int(shard_rows, "shard_rows")
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True)
    cpus_per_actor = check_positive_int(cpus_per_actor, "cpus_per_actor", allow_none=True)
    concurrency = check_positive_int(concurrency, "concurrency", allow_none=True)
    if num_workers is not None and (
        isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    ):
        raise ValueError(f"num_workers must be an int >= 0 or None; got {num_workers!r}")
    num_gpus_per_actor = check_gpus_per_actor(num_gpus_per_actor)
    device = check_actor_device(device, num_gpus_per_actor)
    out = Path(out_dir).resolve()
    source = _resolve_source(values_or_manifest, column, image_root, shard_rows)
    n = source.n
    job = tl.claim_job(
        out,
        {
            "model": str(model_name),
            "shard_rows": shard_rows,
            "column": column,
            "image_root": source.image_root,
            "max_pixels": max_pixels,
            "source": source.fingerprint,
        },
        kind="embed",
        subdir=PARTS_DIR,
    )
    shards = [(k, a, min(n, a + shard_rows)) for k, a in enumerate(range(0, n, shard_rows))]
    todo = []
    for k, a, b in shards:
        path = _part_path(out, a, b)
        if path.exists():
            try:
                _read_part(path, job, a, b)
                continue
            except ValueError as err:
                logger.warning("%s; embedding the shard again", err)
                path.unlink(missing_ok=True)
        todo.append((k, a, b))
    if len(todo) < len(shards):
        logger.info(
            "embed: %d of %d shards already in %s",
            len(shards) - len(todo),
            len(shards),
            out / PARTS_DIR,
        )
    embedded_now = 0
    if todo:
        embedded_now = _run_actors(
            todo,
            source,
            out,
            job,
            model_name=str(model_name),
            batch_size=batch_size,
            num_gpus=num_gpus_per_actor,
            cpus=cpus_per_actor,
            concurrency=concurrency,
            device=device,
            num_workers=num_workers,
            max_pixels=max_pixels,
            address=address,
            progress=progress,
        )
    rows, failures = _assemble(out, job, shards, str(model_name), source.fingerprint)
    summary = EmbedSummary(
        store_path=out / STORE_DIR,
        n_rows=n,
        rows=rows,
        embedded=embedded_now,
        reused=int(rows.shape[0]) - embedded_now,
        failures=failures,
        shards=len(shards),
        shards_computed=len(todo),
        seconds=time.perf_counter() - start_time,
    )
    logger.info("embed: %s", summary.summary())
    return summary


def _run_actors(
    todo,
    source,
    out,
    job,
    *,
    model_name,
    batch_size,
    num_gpus,
    cpus,
    concurrency,
    device,
    num_workers,
    max_pixels,
    address,
    progress,
) -> int:
    """The Ray Data pipeline over the shards to do; returns the rows it embedded."""
    connect(address)
    import ray
    import ray.data

    gpus_here = float(ray.cluster_resources().get("GPU", 0))
    if num_gpus is None:  # auto: a GPU per actor where there are GPUs, unless told "cpu"
        num_gpus = 1 if gpus_here >= 1 and device != "cpu" else 0
        check_actor_device(device, num_gpus)
    if num_gpus > 0 and gpus_here < num_gpus:
        # Ray would wait for ever for a GPU that never comes ("job may hang forever").
        raise ValueError(
            f"num_gpus_per_actor={num_gpus:g} but the Ray cluster has {gpus_here:g} GPU(s); "
            "pass num_gpus_per_actor=0 to embed on CPUs, or add GPU nodes"
        )
    if concurrency is None:
        if num_gpus > 0:
            gpus = int(gpus_here)
            concurrency = max(1, int(gpus / num_gpus))
        else:
            concurrency = max(1, cluster_cpus(ray) // (cpus or 1))
        concurrency = min(concurrency, len(todo))
    cpus, num_workers = actor_cpus(num_gpus, cpus, num_workers, cluster_cpus(ray), concurrency)
    items = [
        {
            "shard": k,
            "start": a,
            "stop": b,
            "payload": pickle.dumps(source.values[a:b]) if source.kind == "values" else b"",
        }
        for k, a, b in todo
    ]
    # Workers need no copy of the in-memory values: each shard carries its own.
    light = _Source(
        source.kind,
        source.n,
        source.column,
        source.path,
        None,
        source.offsets,
        source.image_root,
        source.fingerprint,
    )
    ctx = ray.data.DataContext.get_current()
    ray_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours instead
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _EncoderActor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
        num_cpus=cpus,
        fn_constructor_kwargs={
            "model_name": model_name,
            "batch_size": batch_size,
            "device": device,
            "threads": None if num_gpus > 0 else cpus,
            "num_workers": num_workers,
            "max_pixels": max_pixels,
            "out_dir": str(out),
            "job": job,
            "source": light,
        },
    )
    total = sum(b - a for _, a, b in todo)
    embedded = 0
    logger.info(
        "embed: %d shards (%d rows) on %d actor(s) with %g GPU(s), %d CPU(s) and %d loader "
        "process(es) each",
        len(todo),
        total,
        concurrency,
        num_gpus,
        cpus,
        num_workers,
    )
    try:
        with progress_bar(total, "embedding", unit="img", enabled=progress) as bar:
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                for emb, failed, skipped in zip(
                    batch["embedded"], batch["failed"], batch["skipped"], strict=True
                ):
                    if not skipped:
                        embedded += int(emb)
                    bar.update(int(emb) + int(failed))
    finally:
        ctx.enable_progress_bars = ray_bars
    return embedded


def check_gpus_per_actor(num_gpus: Any) -> float | None:
    """``num_gpus_per_actor`` checked: a number >= 0, or None (auto)."""
    if num_gpus is not None and (
        isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or not num_gpus >= 0
    ):
        raise ValueError(f"num_gpus_per_actor must be a number >= 0 or None; got {num_gpus!r}")
    return num_gpus


def check_actor_device(device: Any, num_gpus: float | None) -> str | None:
    """``device`` for the actors, checked on the driver before anything starts (the
    actors resolve it against Ray's assignment with :func:`actor_device`)."""
    if device is None:
        return None
    text = str(device)
    if text not in ("auto", "cpu") and not is_cuda(text):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {device!r}")
    index = cuda_index(text)  # validates the ordinal's form
    if is_cuda(text) and num_gpus is not None:
        if num_gpus == 0:
            raise ValueError(
                f"device={text!r} needs GPUs for the actors: pass num_gpus_per_actor=1 (one "
                "actor per GPU), or None to use the cluster's GPUs; actors without a GPU "
                "would all run on GPU 0"
            )
        own = max(1, int(np.ceil(num_gpus)))
        if index is not None and index >= own:
            raise ValueError(
                f"device={text!r}: each actor has {own} GPU(s) (num_gpus_per_actor="
                f"{num_gpus:g}), cuda:0 to cuda:{own - 1} as it numbers them"
            )
    return text


#: Loader processes per GPU actor at most (the encoders' CUDA default,
#: :data:`~dedup_index.encode.pipeline.MAX_DEFAULT_WORKERS_CUDA`).
MAX_GPU_ACTOR_WORKERS = 16


def actor_cpus(
    num_gpus: float,
    cpus: int | None,
    num_workers: int | None,
    total_cpus: int,
    actors: int,
) -> tuple[int, int]:
    """``(CPUs per actor, loader processes per actor)`` with the defaults filled in.

    A CPU actor runs the model on its CPUs: 1 CPU unless told, no loader processes unless
    told.  A GPU actor's CPUs decode for the GPU: by default the cluster's CPUs less one
    (for Ray's own tasks) shared among the ``actors``, at most ``1 + 16``, and every CPU
    but the actor's own runs a loader process.
    """
    if num_gpus > 0:
        if cpus is None:
            share = max(1, (total_cpus - 1) // max(1, actors))
            cpus = min(share, 1 + MAX_GPU_ACTOR_WORKERS)
        if num_workers is None:
            num_workers = cpus - 1
    else:
        cpus = 1 if cpus is None else cpus
        num_workers = 0 if num_workers is None else num_workers
    return cpus, num_workers


def _assemble(out: Path, job: str, shards, model_name: str, fingerprint: dict):
    """Append the parts in row order to ``out/store`` (unless it is already complete) and
    write ``failures.jsonl``; returns (input row of each store row, failures)."""
    parts = [_read_part(_part_path(out, a, b), job, a, b) for _, a, b in shards]
    rows = np.concatenate([p["rows"] for p in parts]) if parts else np.zeros(0, np.int64)
    failures = [
        (int(r), LoadFailure(str(reason), str(message)))
        for p in parts
        for r, reason, message in zip(
            p["fail_rows"], p["fail_reasons"], p["fail_messages"], strict=True
        )
    ]
    failures.sort(key=lambda f: f[0])
    store_dir = out / STORE_DIR
    meta = {"model_name": model_name, "job": job, "source": fingerprint}
    try:
        existing = EmbeddingStore.open(store_dir)
        if existing.meta.get("job") == job and len(existing) == rows.shape[0]:
            _write_failures(out, failures)
            return rows, failures
    except StoreError:
        pass
    shutil.rmtree(store_dir, ignore_errors=True)  # derived from the parts: rebuilt
    dim = next((p["embeddings"].shape[1] for p in parts if p["embeddings"].shape[0]), None)
    if dim is not None:
        store = EmbeddingStore.create(store_dir, dim, meta=meta)
        for p in parts:
            if p["rows"].shape[0]:
                # normalised like dedup_embeddings does (float64, one rounding)
                store.append(p["embeddings"], keys=[str(int(r)) for r in p["rows"]])
        store.close()
    _write_failures(out, failures)
    return rows, failures


def _write_failures(out: Path, failures) -> None:
    lines = "".join(
        json.dumps({"row": r, "reason": f.reason, "error": f.message}) + "\n" for r, f in failures
    )
    atomic_write_bytes(out / FAILURES_FILE, lines.encode("utf-8"))
