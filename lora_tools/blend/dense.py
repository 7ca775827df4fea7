"""TIES and DARE on dense updates, one layer at a time, then back to rank R.

Why dense: trimming by magnitude, dropping at random and electing signs act on the
entries of each ΔWᵢ = sᵢ·Bᵢ·Aᵢ, and no factored form survives them. So each layer's
updates are formed in torch (on the GPU when there is one), mixed, and re-factored by
an SVD; only one layer's matrices are alive at a time. This module imports torch; the
factored methods (cat, svd, linear) never import it.

Semantics follow mergekit's `generalized_task_arithmetic` (and the papers):
- TIES (Yadav et al. 2023): keep the int(density·numel) largest |ΔWᵢ| (ties broken by
  topk), elect per entry the sign of Σ wᵢ·τᵢ ("sum" consensus), keep the entries of
  wᵢ·τᵢ that agree with it, and divide by Σ wᵢ over the agreeing inputs (normalize,
  mergekit's default for ties) or not.
- DARE (Yu et al. 2023): keep each entry with probability `density` and divide by it,
  then a plain weighted sum (dare_linear) or the TIES sign election (dare_ties); mergekit
  does not normalize either by default.
Masks come from a CPU generator seeded by (seed, layer name, input position), so a seed
gives the same adapter on any device and whatever other layers are blended.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lora_tools.blend.factored import LayerBlend, Term
from lora_tools.linalg.spectrum import rank_for_energy

# Layers whose smaller side is at most this use an exact SVD; larger ones a seeded
# randomized SVD (Halko et al. 2011) with OVERSAMPLE extra columns and POWER_ITERS power
# iterations, which is within a fraction of a percent of optimal for the spectra TIES and
# DARE leave, at 1/50 of the cost of a full SVD of an 8192×2048 matrix.
EXACT_SVD_MAX_DIM = 1024
OVERSAMPLE = 16
POWER_ITERS = 4

DEFAULT_NORMALIZE = {"ties": True, "dare_ties": False, "dare_linear": False}


def resolve_device(device: str) -> torch.device:
    from lora_tools.linalg.device import resolve_device as resolve

    return resolve(device)


@contextlib.contextmanager
def cpu_threads(device: Any, threads: int = 1) -> Iterator[None]:
    """On the CPU, run the block with torch on `threads` threads, restored after.

    Why one: a layer's work is a few memory-bound passes over ΔW plus many LAPACK calls
    on tall, thin matrices (the QRs of the randomized SVD); with two threads on a busy
    two-core machine each such call can take 0.3 s of spin-waiting instead of 0.3 ms,
    and a 1B TIES blend runs up to 2× slower. GPUs are left alone.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stream_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for one (layer, input) mask: independent of layer order and device."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keep_mask(seed: int, name: str, index: int, shape: Sequence[int], density: float) -> torch.Tensor:
    """DARE's Bernoulli(density) keep-mask (bool, CPU) for input `index` at layer `name`."""
    generator = torch.Generator().manual_seed(stream_seed(seed, name, index))
    return torch.rand(tuple(shape), generator=generator) < density


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the int(density·numel) entries of largest |value|, zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    if k > 0:
        top = torch.topk(flat.abs(), k, sorted=False).indices
        kept[top] = flat[top]
    return kept.reshape(delta.shape)


def consensus_merge(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Sign election and disjoint merge over stacked w·τ (n, m, k): entries agreeing with
    sign(Σ w·τ) (≥ 0 counts as +) are summed, divided by Σ w over them if normalize."""
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)  # (m, k)
    agree = weighted.sign() == elected  # (n, m, k); zeros agree with nothing
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (weights.view(-1, 1, 1) * agree).sum(dim=0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


def mix(
    method: str,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float,
    normalize: bool,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The TIES / DARE combination of dense updates τᵢ (each (m, k)) with weights wᵢ."""
    w = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)
    if method == "ties":
        pruned = [magnitude_trim(d, density) for d in deltas]
    elif method in ("dare_linear", "dare_ties"):
        assert masks is not None, "DARE needs its keep-masks"
        pruned = [d * m.to(d.device) / density for d, m in zip(deltas, masks)] if density < 1 else list(deltas)
    else:
        raise ValueError(f"not a dense method: {method!r}")
    weighted = torch.stack(pruned) * w.view(-1, 1, 1)  # (n, m, k)
    if method == "dare_linear":
        mixed = weighted.sum(dim=0)
        total = float(w.sum())
        return mixed / total if normalize and abs(total) >= 1e-8 else mixed
    return consensus_merge(weighted, w, normalize)


def _norm(x: torch.Tensor) -> float:
    """‖x‖_F accumulated in float64: torch's float32 reduction is off by ~1e-3 at 16M entries."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _randomized_svd(matrix: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-q SVD by a seeded range finder with power iterations: U (m, q), S (q,), Vh (q, n).
    U·diag(S)·Vh = Q·Qᵀ·M for an orthonormal Q, an orthogonal projection of M."""
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(matrix.shape[1], q, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ omega).Q  # (m, q)
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(matrix.T @ basis).Q  # (n, q)
        basis = torch.linalg.qr(matrix @ basis).Q  # (m, q)
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)  # (q, q), (q,), (q, n)
    return basis @ u_small, s, vh


def refactor(
    matrix: torch.Tensor, rank: int | None, energy: float | None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-R factors b (m, R), a (R, n) of `matrix` with √σ on each side, and the
    share of ‖matrix‖_F² they keep. R = rank, or the smallest rank keeping `energy` of
    the energy (capped by rank); the energy target needs the whole spectrum, so it uses
    an exact SVD."""
    m, n = matrix.shape
    k_max = min(m, n)
    wanted = k_max if rank is None else min(rank, k_max)
    if energy is not None or k_max <= EXACT_SVD_MAX_DIM or wanted + OVERSAMPLE >= k_max // 2:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(matrix, wanted + OVERSAMPLE, seed)
    if energy is not None:
        wanted = min(wanted, rank_for_energy(s.double().cpu().numpy(), energy))
    total = _norm(matrix) ** 2
    kept = float(torch.sum(s[:wanted].double() ** 2))
    root = torch.sqrt(s[:wanted])
    b = u[:, :wanted] * root  # (m, R)
    a = root[:, None] * vh[:wanted]  # (R, n)
    return b, a, (1.0 if total == 0.0 else min(1.0, kept / total))


def blend_layer_dense(
    name: str,
    terms: Sequence[Term],
    method: str,
    *,
    rank: int | None,
    energy: float | None,
    density: float,
    normalize: bool,
    seed: int,
    device: Any,
    dtype: torch.dtype = torch.float32,
) -> LayerBlend:
    """Mix one layer's updates with TIES/DARE on `device` and re-factor to rank R.

    The terms are the layer's non-zero inputs; the figures compare b·a with the mixed
    update (its target) and with the plain weighted sum; cosines are the caller's."""
    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)

    deltas = [(tensor(t.b) @ tensor(t.a)) * t.layer.scale for t in terms]  # each (m, n)
    weights = [t.weight for t in terms]
    masks = None
    if method.startswith("dare") and density < 1.0:
        masks = [keep_mask(seed, name, t.index, d.shape, density) for t, d in zip(terms, deltas)]
    mixed = mix(method, deltas, weights, density=density, normalize=normalize, masks=masks)  # (m, n)
    plain_sum = sum(w * d for w, d in zip(weights, deltas))
    del deltas
    svd_seed = stream_seed(seed, name, -1)
    b, a, energy_kept = refactor(mixed, rank, energy, svd_seed)
    approx = b @ a  # (m, n)
    result = LayerBlend(
        b=b.double().cpu().numpy(),
        a=a.double().cpu().numpy(),
        energy_kept=energy_kept,
        residual_fro=_norm(mixed - approx),
        target_norm=_norm(mixed),
        out_norm=_norm(approx),
        sum_norm=_norm(torch.as_tensor(plain_sum)),
        error_vs_sum=_norm(approx - plain_sum),
    )
    assert math.isfinite(result.residual_fro)
    return result
