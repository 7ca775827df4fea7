"""Where dense math runs: the user's --device, checked against what this machine has."""

from __future__ import annotations

import torch

from lora_tools.errors import RequestError


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when present, else the CPU; "cuda:N" must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RequestError(None, f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RequestError(None, f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RequestError(None, f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s))")
    elif resolved.type != "cpu":
        raise RequestError(None, f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return resolved
