"""Where an adapter's tensors come from: a safetensors file or a legacy pickle.

Readers see one small interface (keys, dtype code, numpy array) so that a `.bin` adapter
and a `.safetensors` adapter go through the same key parsing.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from lora_tools.errors import FormatError
from lora_tools.io.dtypes import FLOAT_DTYPES
from lora_tools.io.encode import Deferred, Encoded, bf16_finite
from lora_tools.io.safetensors_file import SafetensorsFile, open_regular, require_valid_unicode

# What a reader keeps of a checked factor: (array read as numpy, stored dtype code) -> the
# object the `LoraLayer` holds. Inspect and blend keep the numpy array; merge and verify
# keep a torch tensor in the stored dtype on the compute device, so that a GPU merge never holds
# the whole adapter in host memory (an 8B r=16 adapter is 168 MB of float32) and a CPU
# merge holds bf16 factors at half the size.
Place = Callable[["np.ndarray | Encoded | Deferred", str], Any]


def keep_numpy(array: np.ndarray | Encoded | Deferred, code: str) -> np.ndarray | Encoded | Deferred:
    return array


def keep_stored(array: np.ndarray | Encoded | Deferred, code: str) -> np.ndarray | Encoded | Deferred:
    """The place that keeps LoRA factors as the file stored them: bf16 ones as
    `io.encode.Encoded` bit patterns, read without a widened copy (resize widens each
    block of rows as it multiplies it: a 1B adapter's factors widened whole are ~180 MB of
    fresh pages, which cost more than reading them). Other tensors, and factors a reader
    computes with (LyCORIS), are numpy as with `keep_numpy`."""
    return array


class TensorSource(Protocol):
    path: Path
    metadata: dict[str, str]
    place: Place

    def keys(self) -> list[str]: ...

    def dtype(self, key: str) -> str: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def numpy(self, key: str) -> np.ndarray: ...

    def close(self) -> None: ...


class SafetensorsSource:
    """Adapter tensors read lazily from a validated safetensors file."""

    def __init__(self, path: Path, place: Place = keep_numpy) -> None:
        self.path = path
        self.place = place
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

    def close(self) -> None:
        self.file.close()


# Before torch 2.6, torch.load(weights_only=True) could still be made to run code
# (CVE-2025-32434): with an older torch, pickles are refused, not loaded.
SAFE_WEIGHTS_ONLY_TORCH = (2, 6)


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as "2.5.1+cu121"."""
    numbers = re.findall(r"\d+", version)[:2]
    return (int(numbers[0]), int(numbers[1])) if len(numbers) == 2 else (0, 0)


class TorchPickleSource:
    """A legacy `adapter_model.bin`, loaded with `torch.load(weights_only=True)` only.

    weights_only refuses any pickle that would import or call arbitrary code, which is
    the whole point: adapters come from strangers.
    """

    def __init__(self, path: Path, place: Place = keep_numpy) -> None:
        import torch

        from lora_tools.io.dtypes import safetensors_code

        self.path = path
        self.place = place
        self.metadata: dict[str, str] = {}
        if torch_release(str(torch.__version__)) < SAFE_WEIGHTS_ONLY_TORCH:
            raise FormatError(
                path,
                f"refused to load pickle: torch {torch.__version__} cannot load it safely (weights_only=True "
                "is bypassable before torch 2.6, CVE-2025-32434); upgrade torch or convert the adapter to safetensors",
            )
        # A regular file only: torch.load of a FIFO would block forever, of /dev/zero never end.
        with os.fdopen(open_regular(path), "rb") as handle:
            state = self._load(path, handle)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise FormatError(path, "not a state dict of named tensors")
        self._tensors: dict[str, Any] = {}
        self._dtypes: dict[str, str] = {}
        for key, tensor in state.items():
            require_valid_unicode(path, key, "tensor name")  # a pickle can hold "\ud800"
            if tensor.layout != torch.strided:  # sparse or quantized: never LoRA factors
                raise FormatError(path, f"tensor {key!r}: unsupported layout {tensor.layout}")
            try:
                self._dtypes[key] = safetensors_code(tensor.dtype)
            except KeyError:
                raise FormatError(path, f"tensor {key!r}: unsupported dtype {tensor.dtype}") from None
            self._tensors[key] = tensor.detach()

    @staticmethod
    def _load(path: Path, handle: BinaryIO) -> Any:
        import torch

        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
                warnings.simplefilter("ignore")
                return torch.load(handle, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
            raise FormatError(
                path, f"refused to load pickle (weights_only=True): {_pickle_problem(exc)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - anything else a hostile pickle may raise
            raise FormatError(path, f"cannot load pickle: {type(exc).__name__}") from None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def numpy(self, key: str) -> np.ndarray:
        """The tensor as numpy; bf16 widened exactly to float32, like SafetensorsFile."""
        import torch

        tensor = self._tensors[key]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        try:
            return tensor.contiguous().numpy()
        except (TypeError, RuntimeError):  # float8 and other dtypes numpy cannot hold
            problem = f"tensor {key!r}: dtype {self._dtypes[key]} cannot be read as numbers here"
            raise FormatError(self.path, problem) from None

    def close(self) -> None:
        """Nothing to close: torch.load read the whole file."""


def _pickle_problem(exc: BaseException) -> str:
    """What torch.load refused, without torch's advice.

    torch's weights_only errors wrap the one telling fact ("... GLOBAL posix.system ...")
    in advice to re-run with weights_only=False or to allowlist the global: advice we must
    never pass on for a stranger's file. So the refused global is named on its own, as
    "Unsupported global: GLOBAL <module.name>"; failing that, the first line that gives no
    such advice; failing that, the exception's type.
    """
    text = str(exc)
    refused = re.search(r"GLOBAL\s+([\w.]+)", text)
    if refused:
        return f"Unsupported global: GLOBAL {refused.group(1)}"[:200]
    advice = ("weights_only", "Weights only", "safe_globals", "allowlist", "trust", "Please file an issue",
              "Check the documentation", "the following error message")
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(word in line for word in advice):
            return line[:200]
    return type(exc).__name__


def open_source(path: Path, place: Place = keep_numpy) -> TensorSource:
    """Open a tensor file by its extension (.safetensors, else a torch pickle)."""
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        return TorchPickleSource(path, place)
    return SafetensorsSource(path, place)


def finite_factor(source: TensorSource, key: str) -> np.ndarray:
    """Read a float tensor and refuse NaN/Inf, which would poison every later number.

    Checks run on this numpy array; readers hand it to `source.place` once they are done."""
    _require_float(source, key)
    return _require_finite(source, key, source.numpy(key))


def stored_factor(source: TensorSource, key: str) -> np.ndarray | Encoded:
    """`finite_factor`, but a tensor of a safetensors file is a read-only view of the file
    mapped (`SafetensorsFile.mapped`), and a bf16 one comes as its bit patterns
    (`Encoded`), checked by exponent: all ones is NaN or Inf. See `keep_stored`."""
    if not isinstance(source, SafetensorsSource):
        return finite_factor(source, key)
    _require_float(source, key)
    if source.dtype(key) != "BF16":
        return _require_finite(source, key, source.file.mapped(key))
    bits = source.file.mapped(key)
    if not bf16_finite(bits):
        raise FormatError(source.path, f"tensor {key!r} contains NaN or Inf")
    return Encoded(bits, "BF16")


def _require_float(source: TensorSource, key: str) -> None:
    if source.dtype(key) not in FLOAT_DTYPES:
        raise FormatError(source.path, f"tensor {key!r} has non-float dtype {source.dtype(key)}")


def _require_finite(source: TensorSource, key: str, array: np.ndarray) -> np.ndarray:
    # a sum is finite when every element is, and NaN/Inf when one is not, unless finite
    # values overflow it (then the full check decides): no whole-array temporary, whose
    # pages cost more than the sum; float16 is summed in float32 (numpy casts in buffers)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and inf − inf are what it looks for
        total = array.sum(dtype=np.float32 if array.dtype == np.float16 else None)  # (the method: no wrapper)
    if not np.isfinite(total) and not np.isfinite(array).all():
        raise FormatError(source.path, f"tensor {key!r} contains NaN or Inf")
    return array


# What `ReadAhead` hands a reader thread at once, and how many such batches it keeps in
# flight: each hand-over costs ~0.1 ms, as much as reading a 50 KB LoHa factor, so small
# tensors go in batches; few enough that arrays read ahead never pile up before they are used.
_BATCH_BYTES = 2 << 20
_BATCHES_AHEAD = 3
_MIN_MEAN_BYTES = 256 << 10
_SPAN_DENSITY = 0.9


class ReadAhead:
    """`finite_factor` of tensors a reader will ask for in about this order. A safetensors
    file of large tensors is read by two threads ahead of `get`, in batches of ~2 MB
    (pread and numpy's widening release the GIL: a 1B adapter loads in about half the
    time); one of many small tensors in a single read of the bytes they span, each `get`
    then a view of them (with `stored`, `stored_factor` maps the file instead: nothing to
    read ahead but the checks). A key asked for out of turn, or twice, is read then; an error
    surfaces at `get` of the key that has it. A context manager: leaving it drops what
    was not asked for."""

    def __init__(self, source: TensorSource, keys: Sequence[str], stored: bool = False) -> None:
        self.source = source
        self._factor = stored_factor if stored else finite_factor
        self._batches: list[list[str]] = []
        self._next = 0
        self._ready: dict[str, Future[dict[str, np.ndarray | Encoded | Exception]]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._span: tuple[np.ndarray, int] | None = None
        self._in_span: set[str] = set()
        unique = list(dict.fromkeys(keys))
        infos = [source.file.info(key) for key in unique] if isinstance(source, SafetensorsSource) else []
        sizes = [info.nbytes for info in infos]
        if infos and sum(sizes) < _MIN_MEAN_BYTES * len(sizes) and not stored:  # (stored: views of the mapped file)
            # many small tensors (a LoHa file's 50 KB factors): the layers built between reads
            # hold the GIL longer than the reads take, so no threads; one read for all of them
            # when they fill most of the bytes between the first and the last
            if sum(sizes) >= _SPAN_DENSITY * (max(i.end for i in infos) - min(i.start for i in infos)):
                assert isinstance(source, SafetensorsSource)
                self._span = source.file.read_span(unique)
                self._in_span = set(unique)
        elif sizes:
            size = 0
            for key, nbytes in zip(unique, sizes):
                if not self._batches or size >= _BATCH_BYTES:
                    self._batches.append([])
                    size = 0
                self._batches[-1].append(key)
                size += nbytes
            if len(self._batches) > 1:
                self._pool = ThreadPoolExecutor(max_workers=2)
        self._fill()

    def _read(self, batch: list[str]) -> dict[str, np.ndarray | Encoded | Exception]:
        values: dict[str, np.ndarray | Encoded | Exception] = {}
        for key in batch:
            try:
                values[key] = self._factor(self.source, key)
            except Exception as exc:  # raised by `get` for this key only
                values[key] = exc
        return values

    def _fill(self) -> None:
        in_flight = {id(future) for future in self._ready.values()}
        while self._pool is not None and self._next < len(self._batches) and len(in_flight) < _BATCHES_AHEAD:
            batch = self._batches[self._next]
            self._next += 1
            future = self._pool.submit(self._read, batch)
            self._ready.update(dict.fromkeys(batch, future))
            in_flight.add(id(future))

    def get(self, key: str) -> np.ndarray | Encoded:
        if self._span is not None and key in self._in_span and isinstance(self.source, SafetensorsSource):
            _require_float(self.source, key)
            return _require_finite(self.source, key, self.source.file.numpy_from(key, *self._span))
        future = self._ready.pop(key, None)
        value = future.result().pop(key) if future is not None else self._factor(self.source, key)
        self._fill()
        if isinstance(value, Exception):
            raise value
        return value

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ready.clear()
        self._span = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
