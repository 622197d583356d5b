"""One tile of the distributed exact search, and its file: numpy only (no ray here).

The rows are cut into blocks of ``b`` rows; the tile ``(a, c)`` with ``a <= c`` is block
``a`` against block ``c``, the unit of work of one Ray task.  A tile's output is what the
``blocked`` backend extracts from the same scores, but already canonical, so the driver
only takes unions and maxima:

- its pairs ``i < j`` with canonical similarity ``>= threshold`` (global row ids);
- for each row of block ``a`` its best canonical score against the rows of block ``c``
  that are later than it, and for each row of block ``c`` its best canonical score against
  the earlier rows of block ``a`` (``-inf`` where there are none).

The per-tile maxima are exact: a tile keeps, per row, every entry within ``delta`` of its
float32 maximum and rescores them in float64 (:class:`~dedup_index.search.tiles.NearBest`,
as the blocked backend does).  The entry holding a row's canonical maximum over the tile
is always among them (its float32 value is within ``2 * D * 2**-24`` of the tile's
float32 maximum, and ``delta`` is four times that bound), so the maximum over tiles of
the tile maxima is the canonical maximum over all rows: the very number the
single-machine ``blocked`` backend returns.

The arithmetic is the blocked backend's own (:mod:`dedup_index.search.tiles`: numpy tile
operations, candidate extraction and near-best bookkeeping), applied to the two blocks as
a small problem with local row ids.  Canonical scores depend only on the two float32
vectors, so rescoring them from the local copy gives the same bits as from the whole
matrix.

A tile's output is one ``.npz`` file written atomically (temp file, fsync, rename), so it
is either complete or absent: a task killed mid-way leaves nothing, its retry writes the
file, and a tile whose file exists is never computed again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes, crash_once, read_json, write_json_atomic
from ..search.pairs import PairSet, rescore_candidates
from ..search.precision import Arithmetic, arithmetic, is_tensor
from ..search.tiles import NearBest, NumpyTiles, canonical_maxima

logger = logging.getLogger(__name__)

#: Version of the tile files and of ``job.json``; anything else is refused.
FORMAT_VERSION = 1
JOB_FILE = "job.json"
TILES_DIR = "tiles"
#: Test hook: a file ``<work_dir>/.fault-once/<a>_<c>`` makes the first task that claims it
#: (by deleting it) kill its own worker process, as a crash mid-run would
#: (:func:`dedup_index.files.crash_once`).
FAULT_DIR = ".fault-once"
_FIELDS = ("header", "i", "j", "s", "best_later", "best_earlier")


@dataclass(frozen=True)
class TileOutput:
    """What tile ``(a, c)`` contributes: its pairs and its partial maxima."""

    a: int
    c: int
    pairs: PairSet
    best_later: np.ndarray  # float64, one per row of block a
    best_earlier: np.ndarray  # float64, one per row of block c


def block_bounds(n: int, block_rows: int, k: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of block ``k``."""
    return k * block_rows, min(n, (k + 1) * block_rows)


def tile_grid(n: int, block_rows: int) -> list[tuple[int, int]]:
    """Every tile ``(a, c)`` with ``a <= c`` of the upper triangle, row-major."""
    blocks = -(-n // block_rows)
    return [(a, c) for a in range(blocks) for c in range(a, blocks)]


def compute_tile(
    rows_a: np.ndarray,
    rows_c: np.ndarray | None,
    threshold: float,
    *,
    start_a: int,
    start_c: int,
    precision: str | Arithmetic = "auto",
    device: str | None = None,
    engine: str | None = None,
) -> tuple[PairSet, np.ndarray, np.ndarray]:
    """Pairs and canonical partial maxima of block ``rows_a`` against block ``rows_c``.

    ``rows_c=None`` is the diagonal tile (the block against itself: only pairs ``i < j``
    inside it).  ``start_a``/``start_c`` are the global ids of the blocks' first rows.
    Returns ``(pairs with global ids, best_later per row of a, best_earlier per row of c)``.
    ``precision``: the tile arithmetic (:mod:`dedup_index.search.precision`; ``auto``
    is resolved on the node that runs the task): the same bits whichever.
    ``device``: a CUDA device (the task's own GPU) runs the tile with the ``blocked``
    backend's device tile code (:class:`~dedup_index.search.blocked.TorchTiles`), as
    does ``engine="torch"`` on the CPU (how the tests hold it); else numpy.  The same
    bits whichever: only the candidates' float32 values differ, and they are rescored.
    """
    diagonal = rows_c is None
    ra = rows_a.shape[0]
    rc = ra if diagonal else rows_c.shape[0]
    d = rows_a.shape[1]
    # The tile as a small problem with local ids: block a's rows, then block c's.
    local = rows_a if diagonal else np.concatenate([rows_a, rows_c])
    off = 0 if diagonal else ra
    arith = (
        precision
        if isinstance(precision, Arithmetic)
        else arithmetic(precision, d, device=device, engine=engine, work=float(ra) * rc * d)
    )
    rounded, arith = arith.prepare(np.ascontiguousarray(local, dtype=np.float32))
    delta = arith.window
    radius = np.float32(threshold - arith.margin)
    if engine == "torch" or device not in (None, "cpu"):
        candidates, later, earlier = _torch_tile(
            rounded, ra, rc, off, radius, delta, device or "cpu", arith
        )
        found = rescore_candidates(local, candidates, threshold)
        pairs = PairSet(found.i + start_a, found.j - off + start_c, found.s)
        best_later, best_earlier = canonical_maxima(local, later, earlier)
        return pairs, best_later[:ra], best_earlier[off : off + rc]
    ops = NumpyTiles(rounded, ra, rc, arith)
    with arith.session():
        s = ops.product(rounded[:ra], rounded[:ra] if diagonal else rounded[off:])
    if diagonal:
        ops.mask_diagonal(s, ra)
    row_max, col_max = ops.maxima(s)
    hit = np.flatnonzero(row_max > radius)
    candidates = []
    if hit.size:
        li, lj = ops.above(s, hit, radius)
        candidates.append((hit[li].astype(np.int64), lj.astype(np.int64) + off))
    found = rescore_candidates(local, candidates, threshold)
    pairs = PairSet(found.i + start_a, found.j - off + start_c, found.s)
    later = NearBest(local.shape[0], delta)
    earlier = NearBest(local.shape[0], delta)
    later.update(np.arange(ra), row_max, partial(ops.gather, s, off, False))
    earlier.update(np.arange(off, off + rc), col_max, partial(ops.gather, s, 0, True))
    best_later, best_earlier = canonical_maxima(local, later, earlier)
    return pairs, best_later[:ra], best_earlier[off : off + rc]


def _torch_tile(rounded, ra: int, rc: int, off: int, radius, delta, device: str, arith):
    """The tile of :func:`compute_tile` (local ids: block a's rows ``:ra``, block c's
    ``off:off + rc``) on a torch device, by :class:`~dedup_index.search.blocked.TorchTiles`:
    ``(candidates, later, earlier)`` with the near-best trackers' maxima filled in."""
    import torch

    from ..search.blocked import DeviceRows, TorchTiles

    dev = torch.device(device)
    rows = rounded if is_tensor(rounded) else torch.from_numpy(rounded)
    on_device = DeviceRows(rows, dev, arith.torch_dtype(), resident=True)
    n_local = rows.shape[0]
    ops = TorchTiles(on_device, n_local, ra, max(ra, rc), radius, delta, None, arith)
    later = NearBest(n_local, delta)
    earlier = NearBest(n_local, delta)
    candidates: list = []
    with arith.session(torch_tiles=True):
        ops.tile(
            on_device.block(0, ra),
            on_device.block(off, off + rc, second=True),
            0,
            off,  # == 0 on the diagonal: the tile masks the row itself and earlier rows
            candidates.append,
            later,
            earlier,
        )
        later.best, earlier.best = ops.maxima()
    return candidates, later, earlier


# ------------------------------------------------------------------------------ files


def tile_path(work_dir: str | os.PathLike, a: int, c: int) -> Path:
    """``<work_dir>/tiles/<a>_<c>.npz``."""
    return Path(work_dir) / TILES_DIR / f"{a}_{c}.npz"


def write_tile(path: str | os.PathLike, out: TileOutput, job_id: str) -> None:
    """Write a tile's output atomically; ``job_id`` ties it to its job (see :func:`job_id`)."""
    header = json.dumps({"version": FORMAT_VERSION, "job": job_id, "a": out.a, "c": out.c})
    buf = io.BytesIO()
    np.savez(
        buf,
        header=np.array(header),
        i=out.pairs.i.astype(np.int64),
        j=out.pairs.j.astype(np.int64),
        s=out.pairs.s.astype(np.float64),
        best_later=out.best_later.astype(np.float64),
        best_earlier=out.best_earlier.astype(np.float64),
    )
    atomic_write_bytes(path, buf.getvalue())


def read_tile(
    path: str | os.PathLike, job_id: str, a: int, c: int, rows_a: int, rows_c: int
) -> TileOutput:
    """Read and check a tile file; ``ValueError`` naming the file if it is not tile
    ``(a, c)`` of this job, with ``rows_a``/``rows_c`` maxima (a damaged or foreign file)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in _FIELDS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"tile file {path} is unreadable: {err}") from err
    header = json.loads(str(data["header"]))
    want = {"version": FORMAT_VERSION, "job": job_id, "a": a, "c": c}
    if header != want:
        raise ValueError(f"tile file {path} has header {header}, expected {want}")
    n_pairs = data["i"].shape[0]
    if (
        data["j"].shape != (n_pairs,)
        or data["s"].shape != (n_pairs,)
        or data["best_later"].shape != (rows_a,)
        or data["best_earlier"].shape != (rows_c,)
    ):
        raise ValueError(f"tile file {path} has inconsistent array shapes")
    return TileOutput(
        a, c, PairSet(data["i"], data["j"], data["s"]), data["best_later"], data["best_earlier"]
    )


def job_id(description: dict) -> str:
    """A short stable id of a job description (sha-256 of its canonical JSON)."""
    import hashlib

    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def claim_job(
    work_dir: str | os.PathLike, description: dict, *, kind: str = "tiles", subdir: str = TILES_DIR
) -> str:
    """Bind ``work_dir`` to this job (write ``job.json``) or check that it is bound to it.

    Files of another job (other rows, threshold, block size or model) must never be merged
    into this one, so a ``work_dir`` holding another job is refused with a message saying
    what differs.  Makes ``work_dir/subdir``.  Returns the job id.
    """
    work_dir = Path(work_dir)
    (work_dir / subdir).mkdir(parents=True, exist_ok=True)
    description = {"kind": kind, **description}
    jid = job_id(description)
    record = {
        "format": "dedup_index.distributed",
        "version": FORMAT_VERSION,
        "job": jid,
        "description": description,
    }
    path = work_dir / JOB_FILE
    if path.exists():
        old = read_json(
            path,
            lambda msg: ValueError(f"{msg}; use a fresh work_dir"),
            format=("format", record["format"]),
            version=("version", FORMAT_VERSION),
            what="job file",
        )
        if old.get("job") != jid:
            before = old.get("description", {})
            differ = sorted(
                k for k in set(before) | set(description) if before.get(k) != description.get(k)
            )
            raise ValueError(
                f"work_dir {work_dir} holds the tiles of another job (differs in "
                f"{', '.join(differ) or 'format'}); use a fresh work_dir or delete it"
            )
        return jid
    write_json_atomic(path, record)
    return jid


def maybe_fault(work_dir: str | os.PathLike, a: int, c: int) -> None:
    """The test hook of :data:`FAULT_DIR`: die (as a killed worker) if this tile is marked."""
    marker = Path(work_dir) / FAULT_DIR / f"{a}_{c}"
    crash_once(marker, f"tile ({a}, {c}): fault marker claimed, killing this worker")
