"""``dedup-index verify``: hold this installation's backends to the dense oracle.

Runs the equivalence harness (:mod:`dedup_index.testing`) on generated adversarial sets
(exact copies, a long chain, dense clusters, pairs planted within 1e-7 of the threshold, and
a shuffled mix of all of them).  Exact backends must match the oracle bit for bit for every
policy and score; approximate backends are reported separately, with the recall they
reached (every pair they report must still be exact: precision 1).  Backends whose library
is missing are listed as skipped.  Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import UsageError, check_positive, check_threshold_arg

DESCRIPTION = """\
Check this installation's search backends against the dense oracle on generated
adversarial sets (exact copies, a long chain, dense clusters, pairs planted within 1e-7 of
the threshold, a shuffled mix). Exact backends must match the oracle bit for bit for every
policy and score; approximate backends are listed separately with the recall they reached
(every pair they report must still be exact). Exit 1 on any failure.
"""

EXAMPLES = """\
examples:
  dedup-index verify                         # 300 rows, D = 16, threshold 0.9, seed 0
  dedup-index verify --rows 2000 --dim 64 --threshold 0.95 --seed 3
  dedup-index verify --backends flat blocked --no-approximate
"""


def add_parser(sub: Any, parents: list) -> None:
    p = sub.add_parser(
        "verify",
        parents=parents,
        help="check every installed backend against the dense oracle; pass/fail table",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=300, help="rows per generated set (default: 300)")
    p.add_argument("--dim", type=int, default=16, help="dimension (default: 16)")
    p.add_argument("--threshold", type=float, default=0.9, help="default: 0.9")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="exact backends to check (default: every exact backend but the oracle)",
    )
    p.add_argument(
        "--no-approximate",
        action="store_true",
        help="skip the approximate backends (partitioned, ivf, hnsw)",
    )
    p.set_defaults(func=command)


def generated_sets(n: int, d: int, threshold: float, seed: int) -> dict[str, Any]:
    """The adversarial sets checked, by name (``n`` rows each, or close to it)."""
    import math

    import numpy as np

    from .. import testing as t

    step = (1.0 + threshold) / 2
    # A chain along a great circle spans at most pi: that bounds its length at this step.
    theta = math.acos(min(1.0, step))
    chain = n if theta == 0 else max(2, min(n, int(math.pi / theta)))
    # Several chains on random great circles, so the set has about n rows too.
    chains = np.concatenate(
        [t.long_chain(seed + k, chain, d, step) for k in range(max(1, n // chain))]
    )
    return {
        "exact copies": t.exact_duplicates(seed, max(1, n // 4), 4, d, scaled=True),
        "long chains": chains,
        "dense clusters": t.dense_clusters(
            seed, max(1, n // 10), 10, d, spread=(1.0 / max(threshold, 1e-3) - 1.0) ** 0.5
        ),
        "near threshold": t.planted_near_threshold(seed, n, d, threshold),
        "mixed": t.mixed_adversarial(seed, n, d, threshold),
    }


def command(args: argparse.Namespace) -> int:
    from .. import search, testing

    check_positive(args.rows, "--rows")
    check_threshold_arg(args.threshold)
    if args.dim < 3:
        raise UsageError(f"--dim must be >= 3 for the generated sets, got {args.dim}")
    exact = tuple(args.backends) if args.backends else testing.default_backends()
    unknown = [b for b in exact if b not in search.EXACT_BACKENDS]
    if unknown:
        raise UsageError(
            f"--backends {unknown} are not exact backends; choose from {search.EXACT_BACKENDS}"
        )
    approximate = () if args.no_approximate else search.APPROXIMATE_BACKENDS
    available, skipped = _installed(exact + approximate)
    start = time.perf_counter()
    sets = generated_sets(args.rows, args.dim, args.threshold, args.seed)
    print(
        f"equivalence with the dense oracle: D = {args.dim}, threshold = {args.threshold}, "
        f"seed = {args.seed}"
    )
    rows: list[tuple[str, ...]] = [("set", "rows", "compared", "checks", "result")]
    failed = 0
    details: list[str] = []
    for name, embeddings in sets.items():
        backends = [b for b in exact if b in available]
        report = testing.check_equivalence(embeddings, args.threshold, backends=backends)
        by_backend: dict[str, list[bool]] = {}
        for check in report.checks:
            label = f"{check.backend} vs {check.oracle}"
            by_backend.setdefault(label, []).append(check.ok)
        for backend, oks in by_backend.items():
            ok = all(oks)
            failed += not ok
            rows.append(
                (name, str(len(embeddings)), backend, f"{sum(oks)}/{len(oks)}", _verdict(ok))
            )
        details += [f"{name}: {m}" for m in report.mismatches]
    _table(rows)

    if approximate:
        from ..dedup import dedup_embeddings
        from ..search.canonical import as_unit_float32
        from ..search.recall import measure_recall

        print("\napproximate backends (recall against exact search; reported pairs must be exact)")
        rows = [("set", "rows", "backend", "recall", "precision", "result")]
        for name, embeddings in sets.items():
            unit = as_unit_float32(embeddings)
            for backend in (b for b in approximate if b in available):
                try:
                    got = dedup_embeddings(unit, args.threshold, backend=backend, normalize=False)
                    rec = measure_recall(unit, args.threshold, got.pairs, sample=len(unit))
                except Exception as exc:  # noqa: BLE001 - a failing backend is a result
                    failed += 1
                    details.append(f"{name}: {backend} raised {type(exc).__name__}: {exc}")
                    rows.append((name, str(len(unit)), backend, "-", "-", "FAIL"))
                    continue
                ok = rec.precision == 1.0
                failed += not ok
                rows.append(
                    (
                        name,
                        str(len(unit)),
                        backend,
                        f"{rec.recall:.4f}",
                        f"{rec.precision:.4f}",
                        _verdict(ok),
                    )
                )
        _table(rows)
    for backend, why in skipped.items():
        print(f"skipped {backend}: {why}")
    if details:
        print("\nmismatches:")
        for line in details:
            print(f"  - {line}")
    seconds = time.perf_counter() - start
    verdict = "PASS" if not failed else f"FAIL ({failed} failed)"
    print(f"\nverify: {verdict} in {seconds:.1f} s")
    return 0 if not failed else 1


def _installed(backends: tuple[str, ...]) -> tuple[set[str], dict[str, str]]:
    """Backends whose library imports here; the others with the reason."""
    needs = {"flat": "faiss", "partitioned": "faiss", "ivf": "faiss", "hnsw": "faiss"}
    available, skipped = set(), {}
    for backend in backends:
        module = needs.get(backend)
        if module is None:
            available.add(backend)
            continue
        try:
            __import__(module)
        except ImportError as exc:
            skipped[backend] = f"{module} is not installed ({exc})"
        else:
            available.add(backend)
    return available, skipped


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
