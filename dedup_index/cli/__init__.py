"""``dedup-index`` console script (placeholder until the CLI lands)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("dedup-index: the command line is not built yet")
