"""Where a merge or verify keeps an adapter's factors: a loader `place` hook (`formats.source.Place`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from lora_tools.io.dtypes import torch_dtype
from lora_tools.io.encode import Deferred, Encoded
from lora_tools.linalg.dense import factor_tensor


def factors_on(device: torch.device) -> Callable[[np.ndarray | Encoded | Deferred, str], torch.Tensor]:
    """A loader's `place` for merge: each checked factor becomes a torch tensor on the
    compute device in its stored dtype, widened (exactly) to the compute dtype only per
    use by `factor_tensor`. The host never holds the adapter as a whole in float32: on a
    GPU the factors go over one by one as they are read, on the CPU bf16 ones take half
    the memory (float32 ones share numpy's memory, nothing is copied)."""

    def place(array: np.ndarray | Encoded | Deferred, code: str) -> torch.Tensor:
        return factor_tensor(array, device, torch_dtype(code))

    return place
