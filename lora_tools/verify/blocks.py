"""verify's streaming side: tensors read by row blocks into reused buffers.

`check_plain_tensor` deals a plain LoRA tensor's row blocks out to the workers
(`workers.BlockWorkers`, each with its own `reader.BlockReader` and `block_math.Workspace`),
folds their sums together and hands the figures to the verdict shared with the
whole-tensor check (`tensor_check.decide`). `bytes_equal` and `converted_equal` compare
the other tensors in chunks, in the same reused buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from lora_tools.engine.plan import TensorPlan, is_plain
from lora_tools.engine.staging import CudaStaging
from lora_tools.engine.stream import all_finite, first_new_non_finite, may_overflow
from lora_tools.io.dtypes import FLOAT_DTYPES, torch_dtype
from lora_tools.io.safetensors_file import SafetensorsFile, TensorInfo
from lora_tools.verify.block_math import (
    FAST_DTYPES,
    Factors,
    Workspace,
    judge_block,
    judge_block_bounded,
    max_block_rows,
    prepare_factors,
    row_blocks,
)
from lora_tools.verify.figures import (
    FORWARD_BATCH,
    K_SIGMAS,
    RECIPE_FP32_ROUND_ONCE,
    Sums,
    TensorCheck,
    fill_figures,
    forward_error,
    peft_recipes,
    relative_error,
    slack_shift_bound,
    unmerged_forward,
    worst_index,
)
from lora_tools.verify.reader import BlockReader, same_bytes
from lora_tools.verify.replay import fits_block, replay_fp32_round_once, replay_peft_block
from lora_tools.verify.screen import SCREEN_DTYPES, screen_block, spread_bound
from lora_tools.verify.tensor_check import INCONCLUSIVE_SPREAD, decide
from lora_tools.verify.workers import BlockWorkers, Worker, single_threaded_torch

__all__ = ["BlockReader", "BlockWorkers", "bytes_equal", "check_plain_tensor", "converted_equal", "device_staging"]

Blocks = Callable[[], Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]]  # (lo, hi, W0 rows, stored rows)

# Raw comparisons of unadapted tensors go this many bytes at a time.
COMPARE_CHUNK = 4 * 1024 * 1024
# Stored dtypes whose default tolerance is judged with the slack only where it can
# matter (`block_math.judge_block_bounded`): their ulp dwarfs float32's slack.
BOUNDED_DTYPES = (torch.bfloat16, torch.float16)


def bytes_equal(workers: BlockWorkers, a: SafetensorsFile, b: SafetensorsFile, name: str) -> bool:
    """Chunked raw comparison of one tensor in two files, in reused buffers, the chunks
    dealt out to the workers (a 1B model's unadapted tensors are 1 GB on each side)."""
    ia, ib = a.info(name), b.info(name)
    if ia.dtype != ib.dtype or ia.shape != ib.shape:
        return False
    chunks = [(first, min(first + COMPARE_CHUNK, ia.nbytes)) for first in range(0, ia.nbytes, COMPARE_CHUNK)]
    differs = threading.Event()

    def job(worker: Worker, first: int, end: int) -> bool:
        if not same_bytes(worker.reader.read(a, ia, first, end - first, 0), worker.reader.read(b, ib, first, end - first, 1)):
            differs.set()
        return not differs.is_set()

    workers.run(chunks, job)
    return not differs.is_set()


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


def device_staging(device: torch.device) -> CudaStaging | None:
    """How a GPU verify moves tensors: merge's pinned chunks (`engine.staging`). None on
    the CPU, where the workers read row blocks themselves."""
    return CudaStaging(device) if device.type == "cuda" else None


def check_plain_tensor(
    plan: TensorPlan, base: SafetensorsFile, merged: SafetensorsFile, workers: BlockWorkers,
    atol: float | None, rtol: float | None, seed: int, *, bounded: bool = True, screen: bool = True,
    staging: CudaStaging | None = None,
) -> TensorCheck | None:
    """The row-block check of one plain LoRA tensor, or None where it does not apply
    (not plain, another dtype, a NaN or an Inf anywhere): the caller then runs the
    whole-tensor check, whose messages and errors are the reference.

    screen (bf16 and fp16 under the default tolerance): first the float32 screen
    (`screen.screen_block`), which accepts a tensor whose bytes merge's float32 recipe
    gives; only a tensor it does not accept is judged by the exact blocks. bounded=False
    judges every block with `judge_block`, the slack of every element computed (the
    reference the bounded path must equal; tests call it, with screen=False). torch runs on
    one thread throughout: the blocks are spread over the workers, and the per-tensor
    extras (factors, the forward check's small products) are too small to split (on a
    busy 2-core machine a split 8×n by n×16 product waited ~15 ms for the other core).

    staging (a GPU verify, `device_staging`): W0 and MERGED are moved whole to its
    device through merge's pinned chunks and judged there as one block, the shape of
    merge's own GPU products, so that merge's GPU recipe replays bit for bit."""
    if staging is not None:
        return _check_on_device(plan, base, merged, staging, atol, rtol, seed, bounded)
    with single_threaded_torch():
        return _check_plain_tensor(plan, base, merged, workers, atol, rtol, seed, bounded, screen)


def _check_plain_tensor(
    plan: TensorPlan, base: SafetensorsFile, merged: SafetensorsFile, workers: BlockWorkers,
    atol: float | None, rtol: float | None, seed: int, bounded: bool, screen: bool,
) -> TensorCheck | None:
    info_base, info_merged = base.info(plan.name), merged.info(plan.name)
    if not _applies(plan, info_base, info_merged):
        return None
    rows, width = info_merged.shape[0], info_merged.numel // info_merged.shape[0]
    factors = prepare_factors(plan.layers, width, seed)
    if screen and atol is None and rtol is None and torch_dtype(info_merged.dtype) in SCREEN_DTYPES:
        screened = _screened(plan, base, merged, info_base, info_merged, factors, workers)
        if screened is not None:
            return screened
    workers.reserve(max_block_rows(rows, width) * width)
    forward = [torch.empty((FORWARD_BATCH, rows), dtype=torch.float64) for _ in range(2)]  # x·MERGEDᵀ, x·W0ᵀ
    blocks = row_blocks(rows, width)

    def judge_all(judge_bounded: bool) -> Sums:
        parts = [Sums() for _ in workers.workers]

        def job(worker: Worker, lo: int, hi: int) -> bool:
            sums = parts[worker.index]
            w0 = worker.reader.rows(base, info_base, lo, hi, width, 0)
            stored = worker.reader.rows(merged, info_merged, lo, hi, width, 1)
            _judge_block(worker.workspace, factors, lo, hi, w0, stored, sums, forward, atol, rtol, judge_bounded)
            return sums.finite

        workers.run(blocks, job)
        total = parts[0]
        for part in parts[1:]:
            total.add(part)
        return total

    first = workers.workers[0]

    def sequential() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for lo, hi in blocks:
            yield lo, hi, first.reader.rows(base, info_base, lo, hi, width, 0), first.reader.rows(merged, info_merged, lo, hi, width, 1)

    return _judged(plan, info_base, info_merged, factors, judge_all, sequential, first.workspace, forward, atol, rtol, bounded)


def _screened(
    plan: TensorPlan, base: SafetensorsFile, merged: SafetensorsFile, info_base: TensorInfo, info_merged: TensorInfo,
    factors: Factors, workers: BlockWorkers,
) -> TensorCheck | None:
    """The float32 screen of a plain bf16/fp16 tensor (`screen`): its check, verdict "ok",
    where every block gives merge's recipe's bytes, the tensor is not its base and a
    rigorous bound on the exact check's σ_k (`screen.spread_bound`) is within the
    inconclusive limit; None otherwise, for the exact blocks."""
    rows, width = info_merged.shape[0], info_merged.numel // info_merged.shape[0]
    dtype = torch_dtype(info_merged.dtype)
    x32 = factors.x.to(torch.float32)
    forward = [torch.empty((FORWARD_BATCH, rows), dtype=torch.float32) for _ in range(2)]  # x·W0ᵀ, x·(MERGED − R)ᵀ
    arrays = (forward[0].numpy(), forward[1].numpy())
    parts = [Sums() for _ in workers.workers]

    def job(worker: Worker, lo: int, hi: int) -> bool:
        w0 = worker.reader.rows(base, info_base, lo, hi, width, 0)
        stored = worker.reader.rows(merged, info_merged, lo, hi, width, 1)
        return screen_block(worker.screen, factors, x32, lo, hi, w0, stored, parts[worker.index], arrays)

    workers.run(row_blocks(rows, width), job)  # (the exact check's blocks: the same replay bits)
    sums = parts[0]
    for part in parts[1:]:
        sums.add(part)
    if not (sums.finite and sums.fp32_round_once) or sums.stored_is_base or sums.update_sq <= 0:
        return None
    if spread_bound(factors, rows, width, sums.max_spacing, dtype) > INCONCLUSIVE_SPREAD:
        return None  # the exact check might find the update unresolvable: let it decide
    check = TensorCheck(plan.name, "ok", str(dtype).removeprefix("torch."))
    allowance = fill_figures(check, sums)
    check.recipe = RECIPE_FP32_ROUND_ONCE
    reference = unmerged_forward(x32.double(), factors.layers, forward[0].double())
    check.forward_rel_error = relative_error(reference + forward[1].double(), reference)  # x·(MERGED − R)ᵀ: x·MERGEDᵀ − reference
    return decide(
        check, sums.update_sq, allowance, dtype, stored_is_base=lambda: False, expected_rounds_to_base=lambda: False,
        fits_strength=lambda: False, worst_at=lambda: worst_index(sums, info_merged.shape),
    )


def _check_on_device(
    plan: TensorPlan, base: SafetensorsFile, merged: SafetensorsFile, staging: CudaStaging,
    atol: float | None, rtol: float | None, seed: int, bounded: bool,
) -> TensorCheck | None:
    """`check_plain_tensor` on the staging's device: the whole tensor is one block, in
    buffers made for it (they go with it: a GPU holds them easily, the host holds none)."""
    info_base, info_merged = base.info(plan.name), merged.info(plan.name)
    if not _applies(plan, info_base, info_merged):
        return None
    device = staging.device
    rows, width = info_merged.shape[0], info_merged.numel // info_merged.shape[0]
    w0 = staging.load(base, plan.name).reshape(-1)
    stored = staging.load(merged, plan.name).reshape(-1)
    workspace = Workspace(device=device)
    workspace.reserve(rows * width)
    factors = prepare_factors(plan.layers, width, seed, device)
    forward = [torch.empty((FORWARD_BATCH, rows), dtype=torch.float64, device=device) for _ in range(2)]

    def judge(judge_bounded: bool) -> Sums:
        sums = Sums()
        _judge_block(workspace, factors, 0, rows, w0, stored, sums, forward, atol, rtol, judge_bounded)
        return sums

    def whole() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        yield 0, rows, w0, stored

    return _judged(plan, info_base, info_merged, factors, judge, whole, workspace, forward, atol, rtol, bounded)


def _judge_block(
    ws: Workspace, f: Factors, lo: int, hi: int, w0: torch.Tensor, stored: torch.Tensor, sums: Sums,
    forward: list[torch.Tensor], atol: float | None, rtol: float | None, bounded: bool,
) -> None:
    """One block judged (`block_math.judge_block_bounded` or `judge_block`), then merge's
    float32 recipe replayed on it while it is still in cache (`replay.replay_fp32_round_once`),
    as long as every block before it replayed. forward: x·MERGEDᵀ, x·W0ᵀ."""
    if bounded:
        judge_block_bounded(ws, f, lo, hi, w0, stored, sums, forward[0], forward[1])
    else:
        judge_block(ws, f, lo, hi, w0, stored, sums, forward[0], forward[1], atol, rtol)
    if sums.finite and sums.fp32_round_once:
        rows = hi - lo
        sums.fp32_round_once = replay_fp32_round_once(ws, ws.block(rows, stored.numel() // rows), f, lo, hi, w0, stored)


def _applies(plan: TensorPlan, info_base: TensorInfo, info_merged: TensorInfo) -> bool:
    """Plain LoRA, both dtypes bf16/fp16/fp32, a matrix (or more) with elements."""
    dtypes = (torch_dtype(info_base.dtype), torch_dtype(info_merged.dtype))
    return (
        is_plain(plan) and all(d in FAST_DTYPES for d in dtypes) and len(info_merged.shape) >= 2 and info_merged.numel > 0
    )


def _judged(
    plan: TensorPlan, info_base: TensorInfo, info_merged: TensorInfo, factors: Factors,
    judge_all: Callable[[bool], Sums], blocks: Blocks, workspace: Workspace, forward: list[torch.Tensor],
    atol: float | None, rtol: float | None, bounded: bool,
) -> TensorCheck | None:
    """The figures and the verdict of a plain tensor from its blocks, however they were
    dealt (workers on the CPU, one block on a device). judge_all(bounded) judges every
    block and folds the sums; blocks() gives them again, in order, for the passes only
    a failing tensor needs (PEFT's recipes, the strength fit); forward: x·MERGEDᵀ, x·W0ᵀ
    as the blocks filled them in."""
    base_dtype, dtype = torch_dtype(info_base.dtype), torch_dtype(info_merged.dtype)
    bounded = bounded and atol is None and rtol is None and dtype in BOUNDED_DTYPES
    sums = judge_all(bounded)
    if not sums.finite:
        return None
    check = TensorCheck(plan.name, "ok", str(dtype).removeprefix("torch."))
    allowance = fill_figures(check, sums)
    if bounded and check.strength_spread is not None and (
        slack_shift_bound(factors.slack, sums.update_sq, info_merged.numel) >= K_SIGMAS * check.strength_spread
    ):  # the slack might set the strength allowance: take it exactly, every element's
        sums = judge_all(False)
        check = TensorCheck(plan.name, "ok", str(dtype).removeprefix("torch."))
        allowance = fill_figures(check, sums)
    check.recipe = _recipe(sums, factors, workspace, blocks, base_dtype)
    forward_merged, forward_base = (t.cpu() for t in forward)
    check.forward_rel_error = forward_error(factors.x.cpu(), factors.layers, forward_merged, forward_base)

    def fits_strength() -> bool:
        assert check.strength is not None
        return all(
            fits_block(workspace, factors, lo, hi, w0, stored, check.strength, atol, rtol) <= 1.0
            for lo, hi, w0, stored in blocks()
        )

    return decide(
        check, sums.update_sq, allowance, dtype,
        stored_is_base=lambda: sums.stored_is_base, expected_rounds_to_base=lambda: sums.expected_rounds_to_base,
        fits_strength=fits_strength, worst_at=lambda: worst_index(sums, info_merged.shape),
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
