"""FP8 re-quantization by the optional C kernels (`_kernels.c`): a block of merged rows
in two passes over memory (its block maxima with a finiteness check, then the scaling,
the cast and the survival sums) where torch takes eleven. The codes and scales are
those of `fp8.requantize`, bit for bit (tests/test_kernels.py); where the kernels are
not built, or do not apply, these functions say so and the caller takes torch's passes.
"""

from __future__ import annotations

from typing import Any

from lora_tools.io.fp8 import Block, FreshScales, block_amax, per_element_rows, scale_grid
from lora_tools.io.kernels import in_turn, native


def fused_applies(out: Any) -> bool:
    """Whether the C kernel (`_kernels.c`) re-quantizes into `out`: built, e4m3fn codes,
    on the CPU. Then `block_amax_checked` and `requantize_measured` take a block of rows in
    two passes over memory instead of eleven."""
    import torch

    return native() is not None and out.dtype == torch.float8_e4m3fn and out.device.type == "cpu"


def block_amax_checked(values: Any, block: Block) -> Any:
    """`block_amax(values, block)`, or None where a value is NaN or infinite: by the C
    kernel in one read where it applies (`fused_applies`; torch takes three passes, and a
    fourth for the check), else by torch."""
    import torch

    kernel = native()
    if kernel is None or values.dtype != torch.float32 or values.device.type != "cpu" or not values.is_contiguous():
        amax = block_amax(values, block)
        return amax if bool(torch.isfinite(amax).all()) else None  # amax is NaN or inf where a value is
    rows, cols = values.shape
    grid_rows, grid_cols = scale_grid((rows, cols), block)
    maxima = torch.empty(rows, grid_cols, dtype=torch.float32)
    x, m = values.numpy(), maxima.numpy()
    # one thread: a read at memory speed, shorter than handing pieces to helpers
    if not kernel.row_maxima(x, m, rows, cols, block[1]):
        return None
    if grid_rows * block[0] > rows:  # a partial last block of rows: zeros change no maximum of |value|
        maxima = torch.cat([maxima, maxima.new_zeros(grid_rows * block[0] - rows, grid_cols)])
    return torch.amax(maxima.view(grid_rows, block[0], grid_cols), dim=1)


def requantize_measured(values: Any, block: Block, fresh: FreshScales, base: Any, old_codes: Any,
                        out: Any) -> tuple[float, int] | None:
    """`requantize(values, …, out=out, fresh=fresh)`'s codes, and what a re-quantization
    kept, in one pass over memory: (Σ (deq(code) − base)², how many codes equal
    `old_codes`), deq as `dequantize` computes it. By the C kernel (eight torch passes in
    one): None, with nothing written, where it does not apply (`fused_applies`, or a
    tensor not contiguous), and the caller takes the torch passes. `values` must be
    finite (`block_amax_checked`) and is left as it was."""
    import torch

    tensors = (values, base, old_codes, out)
    if (not fused_applies(out) or values.dtype != torch.float32 or base.dtype != torch.float32
            or old_codes.element_size() != 1 or values.ndim != 2
            or any(t.device.type != "cpu" or not t.is_contiguous() or t.shape != values.shape for t in tensors)):
        return None
    kernel = native()
    assert kernel is not None  # (fused_applies)
    rows, cols = values.shape
    factors = per_element_rows(fresh.factor.to(torch.float32), rows, block[0]).contiguous()
    scales = per_element_rows(fresh.stored.to(torch.float32), rows, block[0]).contiguous()
    arrays = [t.numpy() for t in (values, factors, scales, base)]
    codes_in, codes_out = old_codes.view(torch.uint8).numpy(), out.view(torch.uint8).numpy()

    def piece(lo: int, hi: int) -> tuple[float, int]:
        x, f, s, w0 = (a[lo:hi] for a in arrays)
        return kernel.requantize_rows(x, f, s, w0, codes_in[lo:hi], codes_out[lo:hi], hi - lo, cols, block[1],
                                      fresh.divide)

    # pieces of rows shared with torch's other threads (the kernel releases the GIL); on a
    # thread of `Requantizing`'s own block workers, torch has one and the block is one piece
    threads = torch.get_num_threads()
    pieces = max(1, min(4 * threads, rows // 16))
    bounds = [rows * i // pieces for i in range(pieces + 1)]
    results = in_turn(pieces, lambda i: piece(bounds[i], bounds[i + 1]), threads)
    return sum(r[0] for r in results), sum(r[1] for r in results)
