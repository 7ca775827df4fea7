"""verify's streaming side: tensors read by row blocks into reused buffers.

Why not `SafetensorsFile.torch`: it allocates a fresh buffer per tensor, and on this
kind of VM the page faults of fresh allocations cost more than reading the bytes.
`BlockReader` reads row ranges (`SafetensorsFile.read_into`, positional reads) into
buffers that live for the whole verify, so a 1B verify touches a few
MiB of memory instead of gigabytes, and each block arrives in cache right before its
passes. `check_plain_tensor` drives `block_math` over the blocks and hands the figures
to the verdict shared with the whole-tensor check (`tensor_check.decide`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lora_tools.engine.plan import TensorPlan, is_plain
from lora_tools.engine.stream import all_finite, first_new_non_finite, may_overflow
from lora_tools.io.dtypes import FLOAT_DTYPES, torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile, TensorInfo
from lora_tools.verify.block_math import (
    FAST_DTYPES,
    Factors,
    Workspace,
    fits_block,
    judge_block,
    max_block_rows,
    prepare_factors,
    replay_peft_block,
    row_blocks,
)
from lora_tools.verify.figures import (
    FORWARD_BATCH,
    RECIPE_FP32_ROUND_ONCE,
    Sums,
    TensorCheck,
    fill_figures,
    forward_error,
    peft_recipes,
    worst_index,
)
from lora_tools.verify.tensor_check import decide

Blocks = Callable[[], Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]]  # (lo, hi, W0 rows, stored rows)

# Raw comparisons of unadapted tensors go this many bytes at a time.
COMPARE_CHUNK = 4 * 1024 * 1024


class BlockReader:
    """Reads into byte buffers reused across tensors, one per slot."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.Tensor, memoryview]] = {}

    def _buffer(self, slot: int, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        held = self._buffers.get(slot)
        if held is None or held[0].numel() < nbytes:
            raw = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            held = (raw, raw.numpy().data)
            self._buffers[slot] = held
        return held

    def read(self, shard: SafetensorsFile, info: TensorInfo, first: int, nbytes: int, slot: int) -> torch.Tensor:
        """Bytes [first, first + nbytes) of the tensor's data, as a uint8 view of slot's buffer."""
        raw, view = self._buffer(slot, nbytes)
        shard.read_into(info.name, view[:nbytes], offset=first)
        return raw[:nbytes]

    def rows(self, shard: SafetensorsFile, info: TensorInfo, lo: int, hi: int, width: int, slot: int) -> torch.Tensor:
        """Rows [lo, hi) of a tensor of `width` elements per row, flat, in its stored dtype."""
        itemsize = torch_dtype(info.dtype).itemsize
        raw = self.read(shard, info, lo * width * itemsize, (hi - lo) * width * itemsize, slot)
        return raw.view(torch_dtype(info.dtype))


def bytes_equal(reader: BlockReader, a: SafetensorsFile, b: SafetensorsFile, name: str) -> bool:
    """Chunked raw comparison of one tensor in two files, in reused buffers."""
    ia, ib = a.info(name), b.info(name)
    if ia.dtype != ib.dtype or ia.shape != ib.shape:
        return False
    for first in range(0, ia.nbytes, COMPARE_CHUNK):
        size = min(COMPARE_CHUNK, ia.nbytes - first)
        if not torch.equal(reader.read(a, ia, first, size, 0), reader.read(b, ib, first, size, 1)):
            return False
    return True


def converted_equal(reader: BlockReader, a: SafetensorsFile, b: SafetensorsFile, name: str) -> bool:
    """A float tensor stored in another float dtype: is it exactly the base rounded to it,
    and no finite base value became ±Inf (past the new dtype's range, which merge refuses
    to write)? Compared a chunk of elements at a time."""
    ia, ib = a.info(name), b.info(name)
    if ia.dtype == ib.dtype or ia.dtype not in FLOAT_DTYPES or ib.dtype not in FLOAT_DTYPES:
        return False
    da, db = torch_dtype(ia.dtype), torch_dtype(ib.dtype)
    step = COMPARE_CHUNK // max(da.itemsize, db.itemsize)
    for first in range(0, ia.numel, step):
        count = min(step, ia.numel - first)
        base = reader.read(a, ia, first * da.itemsize, count * da.itemsize, 0).view(da)
        stored = reader.read(b, ib, first * db.itemsize, count * db.itemsize, 1).view(db)
        if not torch.equal(base.to(db), stored):
            return False
        if may_overflow(da, db) and not all_finite(stored) and first_new_non_finite(base, stored) is not None:
            return False  # ±Inf where the base was finite: the rounding overflowed, nothing to accept
    return True


def check_plain_tensor(
    plan: TensorPlan, base: SafetensorsFile, merged: SafetensorsFile, reader: BlockReader, ws: Workspace,
    atol: float | None, rtol: float | None, seed: int,
) -> TensorCheck | None:
    """The row-block check of one plain LoRA tensor, or None where it does not apply
    (not plain, another dtype, a NaN or an Inf anywhere): the caller then runs the
    whole-tensor check, whose messages and errors are the reference."""
    info_base, info_merged = base.info(plan.name), merged.info(plan.name)
    dtypes = (torch_dtype(info_base.dtype), torch_dtype(info_merged.dtype))
    shape = info_merged.shape
    if not is_plain(plan) or any(d not in FAST_DTYPES for d in dtypes) or len(shape) < 2 or not info_merged.numel:
        return None
    rows, width = shape[0], info_merged.numel // shape[0]
    ws.reserve((max_block_rows(rows, width)) * width)
    factors = prepare_factors(plan.layers, width, seed)
    sums = Sums()
    forward_merged = torch.empty((FORWARD_BATCH, rows), dtype=torch.float64)
    forward_base = torch.empty((FORWARD_BATCH, rows), dtype=torch.float64)

    def blocks() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for lo, hi in row_blocks(rows, width):
            yield lo, hi, reader.rows(base, info_base, lo, hi, width, 0), reader.rows(merged, info_merged, lo, hi, width, 1)

    for lo, hi, w0, stored in blocks():
        judge_block(ws, factors, lo, hi, w0, stored, sums, forward_merged, forward_base, atol, rtol)
        if not sums.finite:
            return None
    dtype = dtypes[1]
    check = TensorCheck(plan.name, "ok", str(dtype).removeprefix("torch."))
    allowance = fill_figures(check, sums)
    check.recipe = _recipe(sums, factors, ws, blocks, dtypes[0])
    check.forward_rel_error = forward_error(factors.x, factors.layers, forward_merged, forward_base)

    def fits_strength() -> bool:
        assert check.strength is not None
        return all(
            fits_block(ws, factors, lo, hi, w0, stored, check.strength, atol, rtol) <= 1.0
            for lo, hi, w0, stored in blocks()
        )

    return decide(
        check, sums.update_sq, allowance, dtype,
        stored_is_base=lambda: sums.stored_is_base, expected_rounds_to_base=lambda: sums.expected_rounds_to_base,
        fits_strength=fits_strength, worst_at=lambda: worst_index(sums, shape),
    )


def _recipe(sums: Sums, factors: Factors, ws: Workspace, blocks: Blocks, base_dtype: torch.dtype) -> str | None:
    """Which known recipe gives the stored bytes (`tensor_check.replayed_recipe`, same
    order). merge's own was replayed with the first pass; PEFT's take another, only when
    that one failed, and stop at the first block that differs."""
    if sums.fp32_round_once:
        return RECIPE_FP32_ROUND_ONCE
    for twice, recipe in peft_recipes(base_dtype):
        if all(replay_peft_block(ws, factors, lo, hi, w0, stored, twice) for lo, hi, w0, stored in blocks()):
            return recipe
    return None
