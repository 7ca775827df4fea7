"""A randomized truncated SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1):
the best rank-k approximation of a large matrix from a sketch of k + oversample columns,
with power iterations for slowly decaying spectra. float64 numpy; no I/O, no torch.

Its factors are an orthogonal projection of D onto span(U_k) (U_k·Σ_k·V_kᵀ = U_k·U_kᵀ·D),
so ‖D − U_k·Σ_k·V_kᵀ‖²_F = ‖D‖²_F − Σ_{i≤k} σᵢ² exactly: with ‖D‖_F measured in the same
pass, the error a caller reports is a true figure, not an estimate.
"""

from __future__ import annotations

import numpy as np


def randomized_svd(d: np.ndarray, k: int, *, oversample: int = 10, power: int = 2,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u (m, l), s (l,), vt (l, n)) with l = min(k + oversample, m, n): the top singular
    triplets of d as the sketch finds them, descending. Deterministic for a seed."""
    m, n = d.shape
    sketch = min(k + oversample, m, n)
    if sketch == 0:
        return np.zeros((m, 0)), np.zeros(0), np.zeros((0, n))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(d @ rng.standard_normal((n, sketch)))  # (m, l): the range of d, sampled
    for _ in range(power):  # re-orthonormalised each half-step, as algorithm 4.4 does
        q, _ = np.linalg.qr(d.T @ q)
        q, _ = np.linalg.qr(d @ q)
    u_small, s, vt = np.linalg.svd(q.T @ d, full_matrices=False)  # (l, n)
    return q @ u_small, s, vt
