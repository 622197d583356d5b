"""Candidate arithmetic of any precision whose error has a proven bound.

The exact searches (``blocked``, the index's cross search, the Ray tiles, the tiles inside
``partitioned``) take no decision on the numbers their GEMM tiles produce: they *gather*
candidates at ``threshold - margin`` and every row's entries within ``window`` of its
tile maximum, and rescore those canonically (float64 dot products of the stored float32
vectors, :mod:`.canonical`).  So the tile arithmetic may be anything whose distance from
the canonical score is bounded by a number ``B`` known before the run: with
``margin > B`` and ``window > 2 B`` the pairs, ``duplicate_of``, ``max_similarity`` and
best-earlier scores are bit for bit those of float32 arithmetic (and of the dense
oracle), whatever the precision.  Only the speed changes: bf16 GEMMs run 1.5-3x float32
on CPUs with AVX512-BF16 (oneDNN) and ~15x on GPU tensor cores.

Precisions (``precision=``): ``"fp32"`` (today's float32 GEMM), ``"bf16"`` and
``"fp16"`` (inputs rounded to that format, products accumulated in float32), and
``"auto"``, which times a small GEMM in each available precision on this machine and
runs the fastest (:func:`resolve_precision`; cached per process and on disk).  ``int8``
is not offered: on the CPUs measured here ``torch._int_mm`` ran below the bf16 path and
its bound (per-row scales) is about twice as wide.

The bound
---------

Let ``x, y`` be the stored float32 rows, ``||x||, ||y|| <= R`` (the library accepts rows
within 1e-3 of unit norm: ``R = 1.001``), ``D`` the dimension, ``c`` the canonical score
and ``s`` the tile's value for the pair.

1. *Input rounding.*  Each coordinate is rounded to nearest in a format of ``p``
   significand bits (bf16: ``p = 8``; fp16: ``p = 11``), unit roundoff ``u = 2^-p``,
   smallest subnormal spacing ``2 eta`` (bf16 ``eta = 2^-134``; fp16 ``eta = 2^-25``):
   ``x^_i = x_i + e_i`` with ``|e_i| <= u |x_i| + eta``.  Then
   ``x^.y^ - x.y = sum(e_i y_i) + sum(x_i f_i) + sum(e_i f_i)``, and with
   ``sum |x_i y_i| <= R^2`` and ``||y||_1 <= sqrt(D) R``::

       |x^.y^ - x.y| <= I = (2u + u^2) R^2 + 2 eta sqrt(D) R (1 + u) + D eta^2.

2. *Accumulation.*  Products of two ``p <= 12``-bit numbers are exact in float32 (24
   bits; an underflowing product loses at most ``2^-150``).  A float32 sum of ``D`` terms
   in *any* order (blocked, split-K, FMA or not: whatever the kernel does) is within
   ``gamma_D = D 2^-24 / (1 - D 2^-24)`` times the sum of the terms' magnitudes, which is
   at most ``P = (1+u)^2 R^2 + 2 (1+u) eta sqrt(D) R + D eta^2``::

       A = gamma_D P + D 2^-150.

3. *Output rounding.*  A kernel that writes its result in the low-precision format
   (unit roundoff ``u_o``: torch's bf16 GEMM on the CPU writes bf16, ``u_o = 2^-8``; 0
   when it writes float32, as torch's ``out_dtype=float32`` on CUDA does) adds
   ``O = u_o P (1 + gamma_D)``.  (oneDNN's float32-output bf16 mode was measured at half
   the speed of its bf16-output GEMM here, 209 vs 413 GFLOP/s on one core: the wider
   band costs far less than that.)

4. *Canonical rounding.*  The canonical score is a float64 pairwise sum of exact
   products: within ``C = ceil(log2 D) 2^-53 R^2 (1 + 2^-50)`` of ``x.y``.

*Measured input rounding.*  When the rounded rows are made before the search (an
in-memory matrix: one pass), the largest rounding error ``E = max_i ||x^_i - x_i||_2``
is known, and ``x^.y^ - x.y = e.y^ + x.f`` with Cauchy-Schwarz gives the tighter
``I' = 2 R E + E^2``.  For bf16 on unit vectors ``E`` is about ``0.0019`` (RNE errors
are spread over the coordinates), so ``I'`` is half of ``I``.  ``x - x^`` is exact in
float32 (``x^`` is within a factor 2 of ``x``); its squared norm, summed in float32, is
scaled up by ``1 + 2 D 2^-24`` to cover that sum's own rounding.

So ``|s - c| <= B = min(I, I') + A + O + C``.  Float32 (``u = eta = 0``) gives ``B ~ D 2^-24``,
the bound :func:`~.canonical.candidate_delta` has always used four times over.

*Pairs.*  ``c >= t`` implies ``s >= t - B > t - margin``: every pair at or above the
threshold is a candidate, and the canonical rescoring decides it.  *Maxima.*  If column
``k*`` holds a row's canonical maximum, then for every column ``k``:
``s_k <= c_k + B <= c_k* + B <= s_k* + 2B``, so ``s_k* >= max_k s_k - 2B >
max - window``: the column holding the canonical maximum is always among the entries
kept within ``window`` of the row's low-precision maximum, and rescoring them gives the
exact maximum.  ``margin = (1 + 1/16) B`` and ``window = 2 margin`` (never below the
float32 ``candidate_delta``), which leaves room for the float32 roundings of
``threshold - margin`` and ``best - window`` themselves (``<= 2^-24``, while
``B/16 >= 2^-19``).  At ``D = 512``: bf16 with bf16 output (the CPU kernel) ``B =
0.0118`` from the formula, ~0.0079 with the measured input error (margin ~0.0084); bf16
with float32 output 0.0079 / ~0.0039; fp16 ``B = 0.00104`` (~0.0005 measured); float32
``candidate_delta = 1.2e-4``.

*Fewer rescorings.*  A wide ``window`` keeps tens of entries per row on clustered data.
Before the float64 rescoring, :func:`~.tiles.tighten` recomputes those entries' float32
dot products (error ``<= B32 = gamma_D R^2``, any summation order) and keeps, per row, those
within the float32 window (``candidate_delta >= 2 B32``) of the best float32 value among
them: the entry holding the canonical maximum is among them (the argument above, with
``B32``), so the same maximum comes out of far fewer float64 dot products.

``tests/test_precision.py`` draws adversarial unit vectors (one large coordinate,
cancelling halves, coordinates at each format's rounding midpoints, subnormal-range
coordinates) and checks ``|s - c| <= B`` for every kernel this machine has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..validation import worker_count
from .canonical import candidate_delta

__all__ = [
    "AUTO_MIN_WORK",
    "MAX_NORM",
    "PRECISIONS",
    "Arithmetic",
    "arithmetic",
    "check_precision",
    "error_bound",
    "measure_rates",
    "resolve_precision",
    "round_to",
]

logger = logging.getLogger(__name__)

#: Accepted values of ``precision=``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: The largest row norm the library accepts (``as_unit_float32(normalize=False)``).
MAX_NORM = 1.001
#: ``auto`` on a CPU considers a low precision only above this many multiply-adds
#: (``N (N - 1) / 2 * D``: ~27k rows at D = 512; ~3 s of float32 GEMM here): below it the
#: search takes about as long as importing torch and timing the kernels.
AUTO_MIN_WORK = 2e11
#: The same when torch is already imported (nothing to load; the timing is cached).
AUTO_MIN_WORK_LOADED = 2e10

#: Significand bits ``p`` (unit roundoff ``2^-p``) and half the smallest subnormal.
_FORMATS = {"bf16": (8, 2.0**-134), "fp16": (11, 2.0**-25)}
_U32 = 2.0**-24


def check_precision(precision: Any) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`; else ``ValueError``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        allowed = ", ".join(repr(p) for p in PRECISIONS)
        raise ValueError(f"precision must be one of {allowed}; got {precision!r}")
    return precision


def error_bound(
    precision: str,
    dim: int,
    *,
    output_unit: float = 0.0,
    norm: float = MAX_NORM,
    row_error: float | None = None,
) -> float:
    """``B``: the most a tile value of ``precision`` can differ from the canonical score
    of two rows of norm ``<= norm`` in ``dim`` dimensions (the module docstring derives
    it).  ``output_unit``: unit roundoff of the kernel's output format (0: float32);
    ``row_error``: the largest ``||x^ - x||_2`` of the rounded rows, when measured."""
    d = max(1, int(dim))
    if precision == "fp32":
        u, eta = 0.0, 0.0
    else:
        p, eta = _FORMATS[precision]
        u = 2.0**-p
    r = float(norm)
    root = math.sqrt(d)
    inputs = (2 * u + u * u) * r * r + 2 * eta * root * r * (1 + u) + d * eta * eta
    if row_error is not None and precision != "fp32":
        e = float(row_error) * (1 + 2.0**-40)
        inputs = min(inputs, 2 * r * e + e * e)
    magnitude = (1 + u) ** 2 * r * r + 2 * (1 + u) * eta * root * r + d * eta * eta
    gamma = d * _U32 / (1 - d * _U32)
    accumulation = gamma * magnitude + d * 2.0**-150
    output = output_unit * magnitude * (1 + gamma)
    canonical = math.ceil(math.log2(d) if d > 1 else 1) * 2.0**-53 * r * r * (1 + 2.0**-50)
    return inputs + accumulation + output + canonical


def round_to(precision: str, x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to nearest-even in ``precision``, returned as float32
    (every value exactly representable in that format).  ``fp32``: ``x`` itself."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if precision == "fp32":
        return x
    if precision == "fp16":
        return x.astype(np.float16).astype(np.float32)
    if precision == "bf16":
        # Round half to even on the top 16 bits (finite rows: |x| <= ~1 never carries
        # into the exponent's all-ones pattern, so uint32 cannot overflow).
        bits = x.view(np.uint32)
        out = bits >> np.uint32(16)
        out &= np.uint32(1)
        out += np.uint32(0x7FFF)
        out += bits
        out &= np.uint32(0xFFFF0000)
        return out.view(np.float32)
    raise ValueError(f"no rounding for precision {precision!r}")


@dataclass
class Arithmetic:
    """How the tiles of one search are computed, and the margins that make it exact.

    ``name``: the precision that runs (never ``"auto"``); ``kernel``: what computes the
    GEMM (``"numpy"``: numpy's BLAS on rows already rounded to ``name``; ``"onednn"``:
    torch's bf16 GEMM on the CPU (oneDNN), bf16 output; ``"torch"``: torch in the format
    itself, on ``device``); ``margin``/``window``: candidates are gathered above
    ``threshold - margin`` and each row keeps its entries within ``window`` of its
    maximum; ``why``: how it was chosen (logged and put in ``result.info``)."""

    name: str
    kernel: str
    device: str
    dim: int
    output_unit: float = 0.0
    why: str = ""
    rates: dict[str, float] = field(default_factory=dict)

    #: The largest ``||x^ - x||`` of the rows last prepared whole (None: not measured).
    row_error: float | None = None

    @property
    def bound(self) -> float:
        return error_bound(
            self.name, self.dim, output_unit=self.output_unit, row_error=self.row_error
        )

    @property
    def exact_fp32(self) -> bool:
        return self.name == "fp32" and self.output_unit == 0.0

    @property
    def margin(self) -> float:
        if self.exact_fp32:
            return candidate_delta(self.dim)  # today's float32 margin, unchanged
        return max(candidate_delta(self.dim), (1 + 1 / 16) * self.bound)

    @property
    def window(self) -> float:
        if self.exact_fp32:
            return candidate_delta(self.dim)  # four times the float32 bound: > 2 B
        return 2.0 * self.margin

    @property
    def rounds(self) -> bool:
        """Rows are rounded before the GEMM (a rounded copy, or rounded as read)."""
        return self.name != "fp32" and self.kernel in ("numpy", "onednn")

    def info(self) -> dict[str, Any]:
        """What ``result.info["precision"]`` records."""
        out = {
            "precision": self.name,
            "kernel": self.kernel,
            "device": self.device,
            "bound": self.bound,
            "row_error": self.row_error,
            "margin": self.margin,
            "window": self.window,
            "why": self.why,
        }
        if self.rates:
            out["gflops"] = {k: round(v, 1) for k, v in self.rates.items()}
        return out

    # ---------------------------------------------------------------- rows and products

    def prepare(self, embeddings) -> tuple[Any, Arithmetic]:
        """``(rows, arithmetic)``: the rows the tiles multiply and the arithmetic to use
        for them.  fp32: ``embeddings`` itself.  A low precision: the largest rounding
        error is measured in one chunked pass, and the arithmetic returned carries it
        (``row_error``: the tighter bound, a narrower window, fewer near-best entries);
        the rows are a rounded copy made in that same pass when it is small (an
        in-memory array whose copy takes at most :data:`WHOLE_COPY_BYTES`), else a view
        that rounds the rows it is asked for (:class:`RoundedRows`: a memmap, a store,
        or a large array is never copied whole, so memory stays bounded at any ``N``).
        Rows that are neither an array nor a store (anything else indexable, e.g. the
        base of a cross search, read a block at a time) are not measured: the a-priori
        bound.  The torch kernel on a GPU rounds on the device; the error is still
        measured here when the rows are in memory."""
        import dataclasses

        if self.name == "fp32":
            return embeddings, self
        tensor = self.kernel == "onednn"
        is_array = isinstance(embeddings, np.ndarray)
        if not is_array and not hasattr(embeddings, "iter_blocks"):  # not measured
            rows = RoundedRows(embeddings, self.name, tensor) if self.rounds else embeddings
            return rows, dataclasses.replace(self, row_error=None)
        n, d = embeddings.shape
        whole = (
            is_array
            and not isinstance(embeddings, np.memmap)
            and n * d * (2 if tensor else 4) <= WHOLE_COPY_BYTES
        )
        out = None
        if whole and tensor:  # bf16 rows in torch (exact: they are rounded to bf16 first)
            import torch

            out = torch.empty(embeddings.shape, dtype=torch.bfloat16)
        elif whole and self.rounds:
            out = np.empty(embeddings.shape, dtype=np.float32)
        step = max(1, (4 << 20) // max(1, 4 * d))

        def part(a: int) -> float:
            chunk = np.asarray(embeddings[a : a + step], dtype=np.float32)
            rounded = round_to(self.name, chunk)
            if tensor and out is not None:
                out[a : a + step] = torch.from_numpy(rounded).to(torch.bfloat16)
            elif out is not None:
                out[a : a + step] = rounded
            # x - x^ is exact in float32 (x^ is within a factor 2 of x); its squared norm
            # summed in float32 is within gamma_D of the true one: scaled up by that.
            diff = chunk - rounded
            sq = float(np.einsum("ij,ij->i", diff, diff).max(initial=0.0))
            return math.sqrt(sq * (1 + 2 * chunk.shape[1] * _U32))

        starts = range(0, n, step)
        threads = min(len(starts), worker_count(None))
        if threads > 1:  # numpy and torch release the GIL: the cores share the chunks
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                err = max(pool.map(part, starts), default=0.0)
        else:
            err = max(map(part, starts), default=0.0)
        if out is not None:
            rows = out
        elif self.rounds:
            rows = RoundedRows(embeddings, self.name, tensor)
        else:
            rows = embeddings
        return rows, dataclasses.replace(self, row_error=max(err, self.row_error or 0.0))

    def product(self, rows_a: np.ndarray, rows_c: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``rows_a @ rows_c.T`` into ``out`` (float32), rows as :meth:`prepare` gave."""
        if self.kernel == "onednn":  # bf16 tensors in, bf16 out (the O term), widened
            import torch

            torch.from_numpy(out).copy_(torch.mm(rows_a, rows_c.T))
            return out
        return np.matmul(rows_a, rows_c.T, out=out)

    @contextlib.contextmanager
    def session(self, *, one_thread: bool = False, torch_tiles: bool = False):
        """Process settings the kernel needs for the duration of a search:
        ``one_thread``: torch single-threaded (one worker per core); on CUDA no TF32 and
        no reduced-precision reductions (the bound assumes float32 sums); everywhere, torch's
        float32 matmul precision "highest" (``set_float32_matmul_precision("medium")``
        lets oneDNN run float32 products in bf16 on CPUs that have it, outside the fp32
        bound).  The caller's settings are restored when the last session ends.
        ``torch_tiles``: the tiles run in torch whatever the kernel (the torch tile loop:
        its float32 products are torch's too); else the numpy kernel needs nothing."""
        if self.kernel == "numpy" and not torch_tiles:
            yield self
            return
        import torch

        cuda = self.device.startswith("cuda")
        with _SESSION_LOCK:
            if _ACTIVE["count"] == 0:  # the first session saves what the last restores
                _ACTIVE["threads"] = torch.get_num_threads()
                # The CUDA switches before the precision: "highest" reads as TF32 off.
                m = torch.backends.cuda.matmul
                _ACTIVE["cuda"] = (m.allow_tf32, _reduced(m, "fp16"), _reduced(m, "bf16"))
                _ACTIVE["cuda_set"] = False
                _ACTIVE["matmul"] = _matmul_precision(torch, "highest")
            _ACTIVE["count"] += 1
            if one_thread:
                torch.set_num_threads(1)
            if cuda:
                m = torch.backends.cuda.matmul
                if m.allow_tf32:  # "highest" turned it off already, unless forced on
                    m.allow_tf32 = False
                _set_reduced(m, "fp16", False)
                _set_reduced(m, "bf16", False)
                _ACTIVE["cuda_set"] = True
        try:
            yield self
        finally:
            with _SESSION_LOCK:
                _ACTIVE["count"] -= 1
                if _ACTIVE["count"] == 0:
                    torch.set_num_threads(_ACTIVE["threads"])
                    # Only switches a session changed are set back (setting TF32's legacy
                    # switch on a CPU search would mix torch's legacy and new precision
                    # APIs, after which torch refuses to report its precision), and the
                    # matmul precision last (it sets the TF32 switch it implies).
                    if _ACTIVE["cuda_set"]:
                        m = torch.backends.cuda.matmul
                        tf32, fp16, bf16 = _ACTIVE["cuda"]
                        if m.allow_tf32 != tf32:
                            m.allow_tf32 = tf32
                        _set_reduced(m, "fp16", fp16)
                        _set_reduced(m, "bf16", bf16)
                    _matmul_precision(torch, _ACTIVE["matmul"])

    # ---------------------------------------------------------------- torch tiles

    def torch_dtype(self):
        """The dtype row blocks are kept in on the torch path."""
        import torch

        if self.kernel in ("torch", "onednn"):
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name, torch.float32)
        return torch.float32

    def torch_product(self, a, c, out):
        """``a @ c.T`` into the float32 tensor ``out`` (torch path: CUDA, or
        ``engine="torch"``); ``a``, ``c`` in :meth:`torch_dtype` (rounded when
        :attr:`rounds`)."""
        import torch

        if self.kernel == "numpy" or self.name == "fp32":
            return torch.mm(a, c.T, out=out)
        if self.output_unit == 0.0:
            return out.copy_(torch.mm(a, c.T, out_dtype=torch.float32))
        return out.copy_(torch.mm(a, c.T))


_SESSION_LOCK = threading.Lock()
#: Sessions open now (searches may overlap in threads): the first saves torch's settings,
#: the last restores them.
_ACTIVE: dict[str, Any] = {"count": 0}


def _reduced(m, fmt: str):
    return getattr(m, f"allow_{fmt}_reduced_precision_reduction", None)


def _set_reduced(m, fmt: str, value) -> None:
    if value is not None and hasattr(m, f"allow_{fmt}_reduced_precision_reduction"):
        setattr(m, f"allow_{fmt}_reduced_precision_reduction", value)


#: A low-precision search copies an in-memory array's rounded rows whole up to this many
#: bytes of copy (a 256k x 512 bf16 matrix); above it, and for memmaps and stores, the
#: rows are rounded as each block is read (:class:`RoundedRows`), so the copy never
#: grows with ``N`` (it was 1 GB at 1M x 512).
WHOLE_COPY_BYTES = 256 << 20


class RoundedRows:
    """Rows of an array or store, rounded to ``precision`` as they are read (as a torch
    bf16 tensor when ``tensor``)."""

    def __init__(self, embeddings, precision: str, tensor: bool = False) -> None:
        self.embeddings = embeddings
        self.precision = precision
        self.tensor = tensor
        self.shape = embeddings.shape

    def __getitem__(self, key):
        rows = round_to(self.precision, np.asarray(self.embeddings[key], dtype=np.float32))
        if self.tensor:
            import torch

            return torch.from_numpy(rows).to(torch.bfloat16)
        return rows


def is_tensor(x) -> bool:
    """A torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch")


# ------------------------------------------------------------------------- choosing


def arithmetic(
    precision: str,
    dim: int,
    *,
    device: str | None = None,
    engine: str | None = None,
    work: float | None = None,
) -> Arithmetic:
    """The :class:`Arithmetic` for ``precision`` (``"auto"`` resolved by
    :func:`resolve_precision`) on ``device``; ``work``: multiply-adds of the search
    (``auto`` skips the timing for small searches)."""
    check_precision(precision)
    device = str(device) if device not in (None, "cpu") else "cpu"
    if precision == "auto":
        name, why, rates = resolve_precision(device=device, work=work, engine=engine)
    else:
        name, why, rates = precision, "asked for", {}
    arith = _kernel_for(name, dim, device, engine)
    arith.why = why if not arith.why else f"{why}; {arith.why}"
    arith.rates = rates
    return arith


def _kernel_for(name: str, dim: int, device: str, engine: str | None) -> Arithmetic:
    if device.startswith("cuda"):
        if name == "fp32":
            return Arithmetic("fp32", "torch", device, dim)
        return Arithmetic(name, "torch", device, dim, output_unit=_cuda_output_unit(name, device))
    if name == "bf16" and _onednn_bf16():
        return Arithmetic("bf16", "onednn", device, dim, output_unit=2.0**-8)
    if name == "fp32":
        return Arithmetic("fp32", "numpy", device, dim)
    note = (
        "no fast path for it on this CPU: float32 GEMM on rounded inputs "
        "(same decisions, no speed-up)"
    )
    return Arithmetic(name, "numpy", device, dim, why=note)


def _onednn_bf16() -> bool:
    """torch is importable with oneDNN (its bf16 GEMM: AVX512-BF16 where the CPU has it;
    whether that is fast is measured, not assumed)."""
    try:
        import torch
    except ImportError:
        return False
    mk = getattr(torch.backends, "mkldnn", None)
    return bool(mk is not None and mk.is_available())


def _cuda_output_unit(name: str, device: str) -> float:
    """0 when ``torch.mm(..., out_dtype=float32)`` works for ``name`` on ``device``,
    else the unit roundoff of the format the kernel writes."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        torch.mm(a, a.T, out_dtype=torch.float32)
        return 0.0
    except (TypeError, RuntimeError, NotImplementedError):
        return 2.0 ** -_FORMATS[name][0]


#: Part of the timing cache's key: bump when a kernel changes (v2: bf16 output on the CPU).
KERNELS_VERSION = 2
_RATES: dict[str, dict[str, float]] = {}
_RATES_LOCK = threading.Lock()


def resolve_precision(
    *, device: str = "cpu", work: float | None = None, engine: str | None = None
) -> tuple[str, str, dict[str, float]]:
    """What ``precision="auto"`` runs here: ``(name, why, measured GFLOP/s)``.

    On a CPU without torch's oneDNN bf16 path: ``fp32`` (nothing else is faster).  A
    search smaller than :data:`AUTO_MIN_WORK` multiply-adds: ``fp32`` (the timing and
    torch's import would cost what they save).  Otherwise :func:`measure_rates` times a
    GEMM in each precision the way the search runs it (one thread per worker on the CPU),
    and the fastest runs if it beats float32 by 10%."""
    device = str(device or "cpu")
    on_cuda = device.startswith("cuda")
    if not on_cuda:
        if engine == "torch":
            return "fp32", "engine='torch' on the CPU runs float32", {}
        import sys

        if work is not None:
            floor = AUTO_MIN_WORK_LOADED if "torch" in sys.modules else AUTO_MIN_WORK
            if work < floor:
                return "fp32", f"small search ({work:.2g} multiply-adds < {floor:.2g})", {}
        if not _onednn_bf16():
            return "fp32", "no torch oneDNN bf16 path on this machine", {}
    rates = measure_rates(device)
    base = rates.get("fp32", 0.0)
    best = max(rates, key=rates.get) if rates else "fp32"
    if best != "fp32" and rates[best] < 1.1 * base:
        best = "fp32"
    shown = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
    return best, f"fastest measured GEMM on {device} (GFLOP/s: {shown})", rates


def measure_rates(device: str = "cpu", *, refresh: bool = False) -> dict[str, float]:
    """GFLOP/s of each precision's tile GEMM on ``device``, per worker thread on the CPU:
    cached per process and on disk (keyed by CPU model, flags and library versions)."""
    device = str(device or "cpu")
    key = _cache_key(device)
    with _RATES_LOCK:
        if not refresh and key in _RATES:
            return dict(_RATES[key])
        path = _cache_file()
        disk = _read_cache(path)
        if not refresh and key in disk:
            _RATES[key] = disk[key]["rates"]
            return dict(_RATES[key])
        rates = _time_kernels(device)
        _RATES[key] = rates
        if path is not None:
            disk[key] = {
                "rates": rates,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            _write_cache(path, disk)
        logger.info("precision: measured GEMM rates on %s: %s", device, rates)
        return dict(rates)


def _time_kernels(device: str) -> dict[str, float]:
    """Best of 3 interleaved timings of a 1024 x 512 @ 512 x 4096 tile per precision."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 512)).astype(np.float32)
    c = rng.standard_normal((4096, 512)).astype(np.float32)
    flops = 2.0 * a.shape[0] * c.shape[0] * a.shape[1]
    runs: dict[str, Any] = {}
    if device.startswith("cuda"):
        import torch

        for name in ("fp32", "bf16", "fp16"):
            arith = _kernel_for(name, 512, device, None)
            ta = torch.from_numpy(a).to(device, arith.torch_dtype())
            tc = torch.from_numpy(np.tile(c, (4, 1))).to(device, arith.torch_dtype())
            out = torch.empty(ta.shape[0], tc.shape[0], device=device)

            def run(arith=arith, ta=ta, tc=tc, out=out):
                with arith.session():
                    for _ in range(8):
                        arith.torch_product(ta, tc, out)
                    torch.cuda.synchronize(device)

            runs[name] = (run, 8 * flops * 4)
    else:
        from threadpoolctl import threadpool_limits

        out = np.empty((a.shape[0], c.shape[0]), dtype=np.float32)
        for name in ("fp32", "bf16"):
            arith = _kernel_for(name, 512, device, None)
            if name != "fp32" and arith.kernel == "numpy":
                continue  # emulated: float32's speed, never chosen
            ra, rc = arith.prepare(a)[0], arith.prepare(c)[0]

            def run(arith=arith, ra=ra, rc=rc):
                with threadpool_limits(1, user_api="blas"), arith.session(one_thread=True):
                    arith.product(ra, rc, out)

            runs[name] = (run, flops)
    best = {name: math.inf for name in runs}
    for run, _ in runs.values():
        run()  # warm-up: packing buffers, oneDNN primitive creation
    for _ in range(3):
        for name, (run, _) in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: runs[name][1] / best[name] / 1e9 for name in runs}


def _cache_key(device: str) -> str:
    import importlib.metadata as md

    parts = [f"kernels v{KERNELS_VERSION}", device, platform.machine(), _cpu_model()]
    for dist in ("numpy", "torch"):
        try:
            parts.append(f"{dist}={md.version(dist)}")
        except md.PackageNotFoundError:
            parts.append(f"{dist}=none")
    parts.append("OPENBLAS_CORETYPE=" + os.environ.get("OPENBLAS_CORETYPE", ""))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor()
    model = flags = ""
    for line in info.splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].strip()
    return model + "|" + hashlib.sha256(flags.encode()).hexdigest()[:8]


def _cache_file() -> Path | None:
    """``$DEDUP_INDEX_PRECISION_CACHE`` (empty or ``0``: no disk cache), else
    ``$XDG_CACHE_HOME/dedup_index/precision.json`` (``~/.cache`` by default)."""
    env = os.environ.get("DEDUP_INDEX_PRECISION_CACHE")
    if env is not None:
        return None if env in ("", "0") else Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dedup_index" / "precision.json"


def _read_cache(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Best effort (a read-only home must not fail a search), atomically."""
    from ..files import write_json_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError as err:
        logger.debug("precision: could not write %s: %s", path, err)


def _matmul_precision(torch: Any, value: str | None) -> str | None:
    """Set torch's float32 matmul precision to ``value`` (None: leave it); return what it
    was.  Torch refuses to answer once a caller mixed its legacy and new TF32 switches: then
    nothing is read or changed here (the CUDA switches are handled on their own)."""
    try:
        before = torch.get_float32_matmul_precision()
        if value is not None and value != before:
            torch.set_float32_matmul_precision(value)
        return before
    except RuntimeError:
        return None
