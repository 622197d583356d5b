"""The fused tile scan of the exact searches: one compiled pass over a GEMM tile.

Every exact CPU search (``blocked``'s workers, the index's cross search) gets a tile of
float32 scores (or the bf16 scores oneDNN's GEMM writes) and needs from it, per entry:
the diagonal mask (a row never meets itself or an earlier row), each row's and each
column's running maximum, the pair candidates (``> radius``) and the near-best entries of
:class:`~.tiles.NearBest` (``>=`` the row's, or the column's, running maximum minus
``delta``).  Done in numpy that is five or six passes over the tile, each a loop in C
over memory the GEMM has just pushed out of cache: about as long as the GEMM itself in
bf16.  :func:`scan_tile` does it in one compiled pass (numba, ``nogil``: the CPU workers
scan in parallel threads), a row at a time while the row is in the L1 cache:

1. one vectorised sweep over the row (bf16 bits widened to float32 in registers, no
   separate widening pass): per block of :data:`BLOCK` columns its maximum, the columns'
   running maxima raised in place, and a flag when an entry reaches its column's running
   maximum minus ``delta``;
2. the row's running maximum is then known, and only the blocks that hold a candidate, a
   row near-best entry or a flagged column entry are read again, entry by entry, to
   append ``(row, column, value)`` triples to preallocated buffers (:class:`TileScan`;
   when a buffer could overflow within the next row, the kernel stops there, the caller
   spills and grows the buffers and the scan resumes at that row).

The near-best tests use running maxima: a row's (every earlier tile, then this whole
row), a column's (every row scanned before it, this one included).  Each is a lower bound
of the final maximum, so every entry within ``delta`` of a final maximum is gathered (a
superset), and :meth:`~.tiles.NearBest.survivors` / :func:`~.tiles.prune_near` drop the
rest with the final maxima: the same survivors and the same bits as before, whatever the
tile shape or the order the rows come in.  All bounds are computed in float32 exactly as
:func:`~.tiles.prune_near` computes them (``best - delta``).

numba compiles the kernel at first use, once per tile dtype (measured on a heavily loaded
2-core machine: 5.4 s for float32, 3.8 s for bf16, plus ~1.3 s to import numba), and
caches the machine code on disk (``cache=True``: in ``__pycache__`` beside this file, or
in numba's user cache directory, ``~/.cache/numba``, when the package is installed
read-only); a later process loads it instead (the first call then costs numba's start-up,
~0.3-2 s depending on load).  This module imports numba: the searches import it lazily,
so ``import dedup_index`` does not.

Why not numpy: the sweep must vectorise.  numba's own ``max`` and loops over signed
indices stay scalar (no fast-math flags on ``select``; a negative-index wrap-around per
access), so :func:`_fmax` emits a flagged select and the sweep runs over unsigned
indices: ~6 G entries/s per core on cache-resident tiles here.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["BLOCK", "TileScan", "as_scan_array", "scan_tile"]

#: Columns per block of the first sweep: a block's maximum and column flag decide whether
#: the second look reads it again (64 float32 = four AVX-512 vectors).
BLOCK = 64


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """The float32 value of bf16 ``bits`` (uint16): shifted into the top half, exact."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _fmax(typingctx, a, b):
    """``max(a, b)`` of two float32 as a select LLVM may vectorise as a reduction: numba's
    own ``max`` emits its select without fast-math flags, which keeps the loop scalar
    (no NaN ever reaches the scan; the sign of a zero maximum does not matter)."""
    if not (a == types.float32 and b == types.float32):
        return None

    def codegen(context, builder, signature, args):
        flags = ("nnan", "nsz")
        above = builder.fcmp_ordered(">", args[0], args[1], flags=flags)
        return builder.select(above, args[0], args[1], flags=flags)

    return types.float32(a, b), codegen


def _widen(x):  # replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_widen, inline="always")
def _widen_impl(x):
    """A tile entry as float32: float32 itself, or bf16 bits (uint16) widened exactly."""
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    return None


@numba.njit(nogil=True, cache=True, fastmath={"nnan", "nsz"})
def _scan_rows(
    tile,
    start,
    diag,
    radius,
    delta,
    row_best,
    col_best,
    cols,
    row0,
    col0,
    pair_i,
    pair_j,
    near_r,
    near_c,
    near_v,
    far_c,
    far_r,
    far_v,
    counts,
    block_max,
    block_hit,
):  # pragma: no cover - compiled
    """Scan rows ``start:`` of ``tile``; returns the row it stopped at (``tile.shape[0]``
    when done, earlier when a buffer might overflow within the next row)."""
    ra, rc = tile.shape
    neg = np.float32(-np.inf)
    n_pair, n_near, n_far = counts[0], counts[1], counts[2]
    cap_pair, cap_near, cap_far = pair_i.shape[0], near_r.shape[0], far_c.shape[0]
    r = start
    while r < ra:
        j0 = r + diag + 1
        if j0 < 0:
            j0 = 0
        if j0 >= rc:
            r += 1
            continue
        width = rc - j0
        if n_pair + width > cap_pair or n_near + width > cap_near:
            break
        if cols and n_far + width > cap_far:
            break
        row = tile[r]
        # Sweep 1: block maxima, column maxima raised, column near-best flags.
        rmax = neg
        b = 0
        k = j0
        while k < rc:
            ke = min(rc, k + BLOCK)
            m = neg
            # Unsigned indices: numba then needs no negative-index wrap-around, and LLVM
            # vectorises the sweep (AVX2/AVX-512).
            if cols:
                hit = False
                for q in range(np.uint64(k), np.uint64(ke)):
                    x = _widen(row[q])
                    m = _fmax(m, x)
                    old = col_best[q]
                    hit |= x >= old - delta
                    col_best[q] = _fmax(old, x)
                block_hit[b] = hit
            else:
                for q in range(np.uint64(k), np.uint64(ke)):
                    m = _fmax(m, _widen(row[q]))
                block_hit[b] = False
            block_max[b] = m
            rmax = max(rmax, m)
            b += 1
            k = ke
        best = max(row_best[r], rmax)
        row_best[r] = best
        bound = best - delta
        # Second look at the blocks holding anything to gather.
        b = 0
        k = j0
        while k < rc:
            ke = min(rc, k + BLOCK)
            m = block_max[b]
            if block_hit[b] or m > radius or (m >= bound and m > neg):
                for q in range(k, ke):
                    x = _widen(row[q])
                    if x > radius:
                        pair_i[n_pair] = row0 + r
                        pair_j[n_pair] = col0 + q
                        n_pair += 1
                    if x >= bound and x > neg:
                        near_r[n_near] = row0 + r
                        near_c[n_near] = col0 + q
                        near_v[n_near] = x
                        n_near += 1
                    if cols and x > neg and x >= col_best[q] - delta:
                        far_c[n_far] = col0 + q
                        far_r[n_far] = row0 + r
                        far_v[n_far] = x
                        n_far += 1
            b += 1
            k = ke
        r += 1
    counts[0] = n_pair
    counts[1] = n_near
    counts[2] = n_far
    return r


def as_scan_array(tile) -> np.ndarray:
    """A tile as the kernel reads it: a C-contiguous 2-D numpy float32 array (or uint16
    bf16 bits) as it is, a torch bf16 tensor as its uint16 bits (zero-copy)."""
    if isinstance(tile, np.ndarray):
        if tile.dtype not in (np.float32, np.uint16) or tile.ndim != 2:
            raise ValueError(
                f"tile must be 2-D float32 (or bf16 bits, uint16); got {tile.dtype} x {tile.ndim}-D"
            )
        return np.ascontiguousarray(tile)
    import torch

    if tile.dtype == torch.bfloat16:
        return tile.contiguous().view(torch.int16).numpy().view(np.uint16)
    if tile.dtype == torch.float32:
        return np.ascontiguousarray(tile.numpy())
    raise ValueError(f"tile must be float32 or bfloat16; got {tile.dtype}")


class TileScan:
    """One thread's scan buffers: :meth:`scan` tiles into them, :meth:`take` the results.

    ``width``: the widest tile (columns) it will see; ``capacity``: entries per output
    buffer to start with (grown when a tile fills them; the default holds a few rows'
    worth).  Not thread-safe: one per worker."""

    def __init__(self, width: int, capacity: int | None = None) -> None:
        width = int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1; got {width}")
        self.width = width
        self.capacity = max(int(capacity or 0), 4 * width, 1 << 15)
        self.block_max = np.empty(-(-width // BLOCK), dtype=np.float32)
        self.block_hit = np.empty(-(-width // BLOCK), dtype=np.bool_)
        self._alloc(self.capacity)
        self.spilled: list[tuple[np.ndarray, ...]] = []
        self.dummy = np.full(1, -np.inf, dtype=np.float32)

    def _alloc(self, cap: int) -> None:
        self.pair_i = np.empty(cap, dtype=np.int64)
        self.pair_j = np.empty(cap, dtype=np.int64)
        self.near_r = np.empty(cap, dtype=np.int64)
        self.near_c = np.empty(cap, dtype=np.int64)
        self.near_v = np.empty(cap, dtype=np.float32)
        self.far_c = np.empty(cap, dtype=np.int64)
        self.far_r = np.empty(cap, dtype=np.int64)
        self.far_v = np.empty(cap, dtype=np.float32)
        self.counts = np.zeros(3, dtype=np.int64)

    def _filled(self) -> tuple[np.ndarray, ...]:
        p, r, f = (int(v) for v in self.counts)
        return (
            self.pair_i[:p].copy(),
            self.pair_j[:p].copy(),
            self.near_r[:r].copy(),
            self.near_c[:r].copy(),
            self.near_v[:r].copy(),
            self.far_c[:f].copy(),
            self.far_r[:f].copy(),
            self.far_v[:f].copy(),
        )

    def scan(
        self,
        tile,
        *,
        radius: float,
        delta: float,
        row_best: np.ndarray,
        col_best: np.ndarray | None = None,
        diag: int | None = None,
        row0: int = 0,
        col0: int = 0,
    ) -> None:
        """Scan one tile (rows ``row0 + r``, columns ``col0 + k``).

        ``row_best`` (float32, one per tile row) and ``col_best`` (one per tile column;
        None: no column maxima or column near-best entries wanted) are the running maxima,
        raised in place.  ``diag``: entries with ``k <= r + diag`` are left out (the row
        itself and earlier rows of a diagonal tile: ``diag = row0 - col0``); None: none.
        Gathered: pairs ``(row, col)`` with value ``> radius``; row near-best ``(row, col,
        value)`` with value ``>= row_best - delta``; column near-best ``(col, row, value)``
        with value ``>= col_best - delta`` (both maxima as raised so far)."""
        s = as_scan_array(tile)
        ra, rc = s.shape
        if rc > self.width:
            raise ValueError(f"tile has {rc} columns; this scan was made for {self.width}")
        if row_best.dtype != np.float32 or row_best.shape[0] != ra:
            raise ValueError(f"row_best must be float32 of length {ra}")
        cols = col_best is not None
        if cols and (col_best.dtype != np.float32 or col_best.shape[0] != rc):
            raise ValueError(f"col_best must be float32 of length {rc}")
        diag = -ra if diag is None else int(diag)  # -ra: no row skips a column
        r = 0
        while r < ra:
            r = _scan_rows(
                s,
                r,
                diag,
                np.float32(radius),
                np.float32(delta),
                row_best,
                col_best if cols else self.dummy,
                cols,
                np.int64(row0),
                np.int64(col0),
                self.pair_i,
                self.pair_j,
                self.near_r,
                self.near_c,
                self.near_v,
                self.far_c,
                self.far_r,
                self.far_v,
                self.counts,
                self.block_max,
                self.block_hit,
            )
            if r < ra:  # a buffer is nearly full: keep what it holds, grow, resume
                self.spilled.append(self._filled())
                self.capacity *= 2
                self._alloc(self.capacity)

    def take(self):
        """What the scans since the last call gathered, and the buffers emptied:
        ``(pairs, near, far)``: ``pairs = (i, j)`` or None; ``near = (row, col, value)``
        and ``far = (col, row, value)``, each None when empty.  Indices int64, values
        float32, in scan order."""
        parts = [*self.spilled, self._filled()]
        self.spilled = []
        self.counts[:] = 0
        if len(parts) == 1:
            joined = parts[0]
        else:
            joined = tuple(np.concatenate(col) for col in zip(*parts, strict=True))
        pi, pj, nr, nc, nv, fc, fr, fv = joined
        pairs = (pi, pj) if pi.size else None
        near = (nr, nc, nv) if nr.size else None
        far = (fc, fr, fv) if fc.size else None
        return pairs, near, far


def scan_tile(tile, **kwargs):
    """One tile scanned with fresh buffers (:meth:`TileScan.scan`): ``(pairs, near,
    far)`` as :meth:`TileScan.take` gives them."""
    s = as_scan_array(tile)
    scan = TileScan(max(1, s.shape[1]))
    scan.scan(s, **kwargs)
    return scan.take()
