"""Whether this machine's CPU BLAS gives a row of B·A the same bits whatever the call's row count.

Row-blocked merges and verify's row-blocked replay are bit-identical to a whole-tensor
GEMM (PEFT's) only where it does. MKL's AVX-512 sgemm (torch's CPU BLAS on AMD EPYC,
seen 2026-12-03) does not: calls of 2-3, 5-7, 9-11… rows, and the ragged last block
of any split, round some elements differently from one call over all rows. No block
size avoids it (the whole call's own tail rows are computed by another kernel), so on
such a machine the tests that split tiny tensors into 3-row blocks hold lora-tools to
what is true there: within one unit in the last place of PEFT's result, every verdict
and figure unchanged, the fp32 recipe replay allowed to find no recipe.
"""

from __future__ import annotations

import functools


@functools.cache
def gemm_rows_invariant() -> bool:
    import torch

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 8, generator=g), torch.randn(8, 64, generator=g)
    whole = b @ a
    return all(
        torch.equal(whole, torch.cat([b[i : i + rows] @ a for i in range(0, 64, rows)])) for rows in (2, 3, 5, 7, 30)
    )
