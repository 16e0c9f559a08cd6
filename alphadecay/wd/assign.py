"""Metric -> weight-decay multiplier maps (official WeightDecayUnbalance.py `get_layer_temps`, :321-361).

Each map takes the metric of every tuned module (NaN where a fit failed) and returns one multiplier per module;
a module's decay is then multiplier x its base decay. Modules with a NaN metric get multiplier 1 (the base decay)
and are left out of the statistics of the others (the official code would propagate the NaN).
"""

from __future__ import annotations

import numpy as np


def _valid(scores: np.ndarray) -> np.ndarray:
    return np.isfinite(scores)


def linear_map(scores: np.ndarray, min_ratio: float, max_ratio: float) -> np.ndarray:
    """tb_linear_map (AlphaDecay): min metric -> min_ratio, max metric -> max_ratio, linear in between.

    When every valid metric is equal the range is degenerate; every module then keeps its base decay (1.0). The
    official `np.interp` would return max_ratio there.
    """
    scores = np.asarray(scores, dtype=np.float64)
    out = np.ones_like(scores)
    ok = _valid(scores)
    if not ok.any():
        return out
    low, high = scores[ok].min(), scores[ok].max()
    if high > low:
        out[ok] = min_ratio + (max_ratio - min_ratio) * (scores[ok] - low) / (high - low)
    return out


def sqrt_map(scores: np.ndarray) -> np.ndarray:
    """tb_sqrt: sqrt(m_i) / sum_j(sqrt(m_j) + 1e-8) * n (mean-preserving up to the 1e-8)."""
    return _normalised(np.sqrt, scores)


def log2_map(scores: np.ndarray) -> np.ndarray:
    """tb_log2: log2(m_i) / sum_j(log2(m_j) + 1e-8) * n (alpha > 1, so every term is positive)."""
    return _normalised(np.log2, scores)


def _normalised(transform, scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    out = np.ones_like(scores)
    ok = _valid(scores) & (scores > 0)
    if ok.any():
        values = transform(scores[ok])
        out[ok] = values / np.sum(values + 1e-8) * ok.sum()
    return out


def layerwise_sigmoid(scores: np.ndarray, blocks: list, slope: float = 4.0) -> np.ndarray:
    """AdaDecay as the paper ran it: z-score within each block (population std + 1e-8), multiplier 2*sigmoid(slope*z)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.ones_like(scores)
    ok = _valid(scores)
    for block in dict.fromkeys(blocks):
        idx = np.array([i for i, b in enumerate(blocks) if b == block and ok[i]], dtype=int)
        if idx.size == 0:
            continue
        values = scores[idx]
        z = (values - values.mean()) / (values.std() + 1e-8)
        out[idx] = 2.0 / (1.0 + np.exp(-slope * z))
    return out


def assign(name: str, scores: np.ndarray, *, blocks: list, min_ratio: float, max_ratio: float,
           slope: float = 4.0) -> np.ndarray:
    """The map selected by --assign_func."""
    if name == "tb_linear_map":
        return linear_map(scores, min_ratio, max_ratio)
    if name == "tb_sqrt":
        return sqrt_map(scores)
    if name == "tb_log2":
        return log2_map(scores)
    if name == "layerwise_sigmoid":
        return layerwise_sigmoid(scores, blocks, slope)
    raise ValueError(f"unknown assign_func {name!r}")
