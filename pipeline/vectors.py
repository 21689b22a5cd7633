"""Search vectors: unit L2 norm rows (numpy only, so readers of the index need no torch)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

# Norms below this are treated as zero vectors (a track's embedding can equal the model's center).
_MIN_NORM = 1e-12


def l2_normalise(vectors: np.ndarray, *, names: Sequence[str] = ()) -> np.ndarray:
    """Rows of ``vectors`` (N, D) scaled to unit L2 norm, float32; all-zero rows stay zero (logged by name)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = norms[:, 0] < _MIN_NORM
    if zero.any():
        which = [names[i] for i in np.flatnonzero(zero)] if names else np.flatnonzero(zero).tolist()
        log.warning("zero embedding (left as zeros, never a close neighbour): %s", which)
    return vectors / np.where(zero[:, None], 1.0, norms)
