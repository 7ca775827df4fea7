"""Merge recipes replayed on one block of rows of a plain LoRA tensor.

Why this exists: a merged checkpoint may have been made by `merge` itself or by PEFT
(on a CPU or a GPU), and each recipe rounds differently. verify re-does the merge
recipes a checkpoint may have been made with, block by block, to tell them apart: the
one that gives every block's stored bytes names the tensor's recipe (the order and the
names are `figures.peft_recipes` and `tensor_check.replayed_recipe`'s). The replays are
float32 and bit-exact: `merge`'s own arithmetic (`dense.merge_block_into`, at least two
rows per GEMM; `replay_fp32_round_once`, run right after each block is judged, while it
is in cache) and PEFT's (`figures.peft_delta_into`; `replay_peft_block`, a second pass
only when merge's own recipe failed). `fits_block` re-does the expectation at a fitted
strength, for a tensor that fails (`figures.fit_residual`).

Judging a block (the expectation, the figures, the worst element) is `block_math`'s;
this module uses its workspace, buffers and factors, and `block_math` imports nothing
from here.
"""

from __future__ import annotations

import torch

from lora_tools.linalg.dense import merge_block_into
from lora_tools.verify.block_math import Buffers, Factors, Workspace, expected_into, same_values
from lora_tools.verify.figures import fit_residual, peft_delta_into, slack_into


def replay_fp32_round_once(
    ws: Workspace, views: Buffers, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor
) -> bool:
    """Does `merge`'s float32 recipe give these rows' stored bytes? merge's own block
    arithmetic (`dense.merge_block_into`, fused as on the CPU), on this block."""
    widened, acc, spare = views.mat32
    views.flat32[0].copy_(w0)
    merge_block_into(acc, widened, f.replay, lo, hi, spare)
    rounded = ws.narrow(views, stored.dtype)[0].copy_(views.flat32[1])
    return same_values(rounded, stored)


def replay_peft_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, twice: bool
) -> bool:
    """PEFT with factors in the model's dtype, on these rows (`figures.peft_recipes`)."""
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    current, delta = ws.narrow(views, w0.dtype)
    current.copy_(w0)
    for b, a, factor in f.peft:
        torch.matmul(b[lo:hi], a, out=views.mat32[0])
        current.add_(peft_delta_into(delta, views.flat32[0], factor, twice))
    return bool(torch.equal(current, stored))


def fits_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, strength: float,
    atol: float | None, rtol: float | None,
) -> float:
    """Worst |stored − (W0 + k·ΔW)| over its tolerance in these rows (`figures.fit_residual`)."""
    rows = hi - lo
    views = ws.block(rows, stored.numel() // rows)
    expected_into(f, lo, hi, w0, views)
    views.flat64[3].copy_(stored)
    if atol is None and rtol is None:
        slack_into(views.mat32[1], views.mat32[2], f.slack, lo, hi)
    return fit_residual(views.flat64, views.flat32[1], views.flat32[0], strength, stored.dtype, atol, rtol)
