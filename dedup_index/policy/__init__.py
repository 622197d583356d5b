"""Decisions from pairs: which rows stay, which go, and whom each removed row duplicates."""

from .reference import POLICIES, Decisions, decide, reference_decisions

__all__ = ["Decisions", "POLICIES", "decide", "reference_decisions"]
