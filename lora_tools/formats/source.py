"""Where an adapter's tensors come from: a safetensors file or a legacy pickle.

Readers see one small interface (keys, dtype code, numpy array) so that a `.bin` adapter
and a `.safetensors` adapter go through the same key parsing.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Protocol

import numpy as np

from lora_tools.errors import FormatError
from lora_tools.safetensors_file import SafetensorsFile


class TensorSource(Protocol):
    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...

    def dtype(self, key: str) -> str: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def numpy(self, key: str) -> np.ndarray: ...


class SafetensorsSource:
    """Adapter tensors read lazily from a validated safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = SafetensorsFile(path)
        self.metadata = dict(self.file.metadata)

    def keys(self) -> list[str]:
        return self.file.keys()

    def dtype(self, key: str) -> str:
        return self.file.info(key).dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.info(key).shape

    def numpy(self, key: str) -> np.ndarray:
        return self.file.numpy(key)


class TorchPickleSource:
    """A legacy `adapter_model.bin`, loaded with `torch.load(weights_only=True)` only.

    weights_only refuses any pickle that would import or call arbitrary code, which is
    the whole point: adapters come from strangers.
    """

    def __init__(self, path: Path) -> None:
        from lora_tools.torch_dtypes import safetensors_code

        import torch

        self.path = path
        self.metadata: dict[str, str] = {}
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FormatError(path, "no such file") from None
        except PermissionError:
            raise FormatError(path, "permission denied") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FormatError(
                path, f"refused to load pickle (weights_only=True): {first_line[:200]}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - anything else a hostile pickle may raise
            raise FormatError(path, f"cannot load pickle: {type(exc).__name__}") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise FormatError(path, "not a state dict of named tensors")
        self._arrays: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, str] = {}
        for key, tensor in state.items():
            try:
                self._dtypes[key] = safetensors_code(tensor.dtype)
            except KeyError:
                raise FormatError(path, f"tensor {key!r}: unsupported dtype {tensor.dtype}") from None
            widened = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            self._arrays[key] = widened.detach().contiguous().numpy()

    def keys(self) -> list[str]:
        return list(self._arrays)

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def numpy(self, key: str) -> np.ndarray:
        return self._arrays[key]


def open_source(path: Path) -> TensorSource:
    """Open a tensor file by its extension (.safetensors, else a torch pickle)."""
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        return TorchPickleSource(path)
    return SafetensorsSource(path)


def finite_factor(source: TensorSource, key: str) -> np.ndarray:
    """Read a float tensor and refuse NaN/Inf, which would poison every later number."""
    if source.dtype(key) not in {"F64", "F32", "F16", "BF16"}:
        raise FormatError(source.path, f"tensor {key!r} has non-float dtype {source.dtype(key)}")
    array = source.numpy(key)
    if not np.isfinite(array).all():
        raise FormatError(source.path, f"tensor {key!r} contains NaN or Inf")
    return array
