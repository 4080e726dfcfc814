"""Comparing two embeddings of the same inputs, row by row: the embedding export's fp32 and INT8
gates, `sphana convert`'s match to sentence-transformers, a server's shadow traffic and the
benchmarks all use this one definition. Only numpy: the build and the server import it, and
editing the corpus index (:mod:`sphana.index`) does not touch the encoders' stages."""

from __future__ import annotations

from typing import Any

import numpy as np


def row_cosines(a: Any, b: Any) -> np.ndarray:
    """The cosine of each row of ``a`` to the same row of ``b`` (two embeddings of the same
    inputs; neither need be unit length, a zero row gives 0, a NaN stays NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)
