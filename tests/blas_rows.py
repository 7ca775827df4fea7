"""Whether this machine's CPU BLAS gives a row of B·A the same bits in lora-tools' row
blocks as in one call over all rows.

Row-blocked merges and verify's row-blocked replay are bit-identical to a whole-tensor
GEMM (PEFT's) only where it does. MKL's sgemm (torch's CPU BLAS on the AMD EPYC dev box,
seen 2026-12-03) rounds calls of 2-3 rows, and of 5-11 rows split over two threads,
differently from one call over all rows; every call of 12 rows or more, at any start,
gives the whole call's bits there. So lora-tools' blocks never have fewer than
`dense.MIN_BLOCK_ROWS` rows (`dense.row_blocks_of`), and this probe splits as it does. On
a machine where even those differ, the tests hold lora-tools to what is true there:
within one unit in the last place of PEFT's result, every verdict and figure
unchanged, the fp32 recipe replay allowed to find no recipe.
"""

from __future__ import annotations

import functools


@functools.cache
def gemm_rows_invariant() -> bool:
    import torch

    from lora_tools.linalg.dense import row_blocks_of

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(203, 8, generator=g), torch.randn(8, 64, generator=g)
    whole = b @ a
    return all(
        torch.equal(whole, torch.cat([b[lo:hi] @ a for lo, hi in row_blocks_of(203, step)])) for step in (1, 16, 20, 30, 64)
    )
