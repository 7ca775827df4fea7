"""Type stub of the optional C kernels `_kernels.c` (loaded by `lora_tools.io.kernels.native`)."""

from typing_extensions import Buffer

def requantize_rows(
    values: Buffer, factors: Buffer, scales: Buffer, base: Buffer, old_codes: Buffer, out_codes: Buffer,
    rows: int, cols: int, block_cols: int, divide: bool, /,
) -> tuple[float, int]: ...
def row_maxima(values: Buffer, maxima: Buffer, rows: int, cols: int, block_cols: int, /) -> bool: ...
def bf16_round(values: Buffer, out: Buffer, /) -> bool: ...
