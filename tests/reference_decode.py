"""Test helper: the AQLM decode written straight from the layout, in numpy float64."""

from __future__ import annotations

import numpy as np


def additive_decode_np(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Tile by tile: ``W[o*og:(o+1)*og, i*ig:(i+1)*ig] = s[o] * Σ_m C[m, codes[o, i, m]]``."""
    n_og, n_ig, num_codebooks = codes.shape
    _, _, og, ig = codebooks.shape
    out = np.zeros((n_og * og, n_ig * ig), np.float64)
    for o in range(n_og):
        for i in range(n_ig):
            tile = sum(codebooks[m, codes[o, i, m]].astype(np.float64) for m in range(num_codebooks))
            out[o * og : (o + 1) * og, i * ig : (i + 1) * ig] = float(scales[o, 0, 0, 0]) * tile
    return out
