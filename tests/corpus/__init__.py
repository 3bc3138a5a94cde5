"""A corpus of malformed and hostile uploads, generated in memory (no binary files are committed)."""

from .generate import ACCEPTED, REJECTED, Case, Probe, build_corpus

__all__ = ["ACCEPTED", "REJECTED", "Case", "Probe", "build_corpus"]
