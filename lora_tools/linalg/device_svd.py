"""`extract`'s SVDs on a torch device (a GPU when there is one): the same algorithms as
numpy's full SVD and `linalg.randomized`, in float64, returning numpy on the host.

Why float64 on the device too: the reported error of a randomized truncation is
‖D‖² − Σ kept σ², a difference of nearly equal numbers when the truncation is good; in
float32 it would lose the digits the report promises. Datacenter GPUs run float64 GEMMs
at a useful rate; the products dominate (a sketch of k + 10 columns, two power iterations).
"""

from __future__ import annotations

import numpy as np
import torch


def difference(w0: torch.Tensor, w1: torch.Tensor, device: torch.device) -> torch.Tensor:
    """D = W_tuned − W_base in float64 on `device`, as a matrix (out, in·k)."""
    d = w1.to(device=device, dtype=torch.float64) - w0.to(device=device, dtype=torch.float64)
    return d.reshape(d.shape[0], -1)


def svd(d: torch.Tensor, k: int | None, *, oversample: int = 10, power: int = 2,
        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(u, s, vt, ‖D‖²) as numpy: the full SVD when k is None, else the randomized one
    (Halko et al., as `linalg.randomized.randomized_svd`, with a seeded generator)."""
    total_sq = float(torch.sum(d * d))
    if k is None:
        u, s, vt = torch.linalg.svd(d, full_matrices=False)
    else:
        m, n = d.shape
        sketch = min(k + oversample, m, n)
        generator = torch.Generator(device=d.device).manual_seed(seed)
        omega = torch.randn(n, sketch, dtype=d.dtype, device=d.device, generator=generator)
        q, _ = torch.linalg.qr(d @ omega)
        for _ in range(power):
            q, _ = torch.linalg.qr(d.T @ q)
            q, _ = torch.linalg.qr(d @ q)
        u_small, s, vt = torch.linalg.svd(q.T @ d, full_matrices=False)
        u = q @ u_small
    return u.cpu().numpy(), s.cpu().numpy(), vt.cpu().numpy(), total_sq
