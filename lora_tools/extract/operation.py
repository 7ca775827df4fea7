"""`extract`: a LoRA adapter from a full fine-tune, BASE and TUNED read one tensor pair at a
time, with the error it costs stated exactly.

Every weight matrix that differs (conv kernels as (out, in·k)) becomes a LoRA layer: the
truncated SVD of D = W_tuned − W_base (`layers`), written balanced with alpha = r (scale 1).
Tensors that are no matrix (norms), embeddings and heads (`--full-modules`) that changed
are written whole (PEFT modules_to_save); changed biases go with PEFT's `bias: "all"`.
Memory: one tensor pair and its difference at a time; `--budget` reads the pairs twice
(spectra first, then the factors at the ranks chosen over the whole model).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_tools.adapter import LoraLayer
from lora_tools.errors import MismatchError, RequestError
from lora_tools.extract.layers import LayerExtractReport, Spectrum, balanced, choose_rank, decompose, report, spectrum
from lora_tools.extract.options import DEFAULT_FULL_MODULES, DTYPES, EXACT_UP_TO, FORMATS, METHODS
from lora_tools.linalg.rank_policy import RankPolicy, budget_ranks, policy_from_options


@dataclass
class ExtractReport:
    base: str
    tuned: str
    out: str
    format: str
    dtype: str
    method: str  # what was asked: auto, exact or randomized (each layer says which it got)
    policy: str  # rank, energy, sv_ratio or budget
    n_layers: int
    full_tensors: list[str]  # written whole (modules_to_save, biases)
    unchanged: int  # tensors equal in BASE and TUNED, skipped
    params: int  # the adapter's parameters: factors and full tensors
    energy_kept: float  # 1 − Σ residual² / Σ ‖D‖² over layers
    relative_error: float  # √(Σ residual²) / √(Σ ‖D‖²)
    worst_layer: str | None
    worst_relative_error: float
    notes: list[str]
    seconds: float
    layers: list[LayerExtractReport]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_options(rank: int | None, energy: float | None, sv_ratio: float | None, budget: int | None, min_rank: int,
                  method: str, out_format: str, dtype: str) -> tuple[RankPolicy, str]:
    chosen = {k: v for k, v in (("energy", energy), ("sv_ratio", sv_ratio), ("budget", budget)) if v is not None}
    if not chosen and rank is None:
        raise RequestError(None, "choose a policy: --rank, --energy, --sv-ratio or --budget")
    policy, kind = policy_from_options(rank, min_rank, chosen)
    for option, choices, flag in ((method, METHODS, "method"), (out_format, FORMATS, "--format"), (dtype, DTYPES, "--dtype")):
        if option not in choices:
            raise RequestError(None, f"{flag} must be one of {', '.join(choices)}, got {option!r}")
    return policy, kind or "rank"


def _compile(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise RequestError(None, f"{flag}: not a regular expression ({error})") from None


def _pairs_agree(base: Any, tuned: Any, base_path: str, tuned_path: str) -> list[str]:
    """BASE's tensor names in storage order, after checking TUNED has the same names and shapes."""
    names = base.tensor_names()
    missing = [n for n in names if not tuned.has(n)]
    if missing:
        raise MismatchError(tuned_path, f"has no tensor {missing[0]!r} (BASE {base_path} has it): not the same architecture")
    extra = sorted(set(tuned.weight_map) - set(names))
    if extra:
        raise MismatchError(tuned_path, f"has tensor {extra[0]!r} that BASE {base_path} has not: not the same architecture")
    for name in names:
        if tuple(base.info(name).shape) != tuple(tuned.info(name).shape):
            raise MismatchError(tuned_path, f"tensor {name!r} has shape {list(tuned.info(name).shape)}, "
                                            f"BASE {base_path} has {list(base.info(name).shape)}")
    return names


@dataclass
class _Matrix:
    name: str  # module path
    key: str
    shape: tuple[int, ...]  # the weight's
    method: str
    spec: Spectrum
    base_fro: float


def extract(
    base_path: str | os.PathLike[str], tuned_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
    rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None, budget: int | None = None,
    min_rank: int = 1, modules: str | None = None, exclude: str | None = None, full_modules: str | None = None,
    method: str = "auto", out_format: str = "peft", dtype: str = "fp32", force: bool = False, progress: Any = None,
    device: str = "cpu",
) -> ExtractReport:
    """Read BASE and TUNED pair by pair, extract, write OUT atomically, report per layer.
    `progress` (start(tensors, bytes, label), advance(tensors, bytes)): the pairs read.
    `device`: "cpu" (numpy, float64), "cuda[:N]" (torch, float64 on the GPU) or "auto"."""
    from lora_tools.io.atomic import written_atomically
    from lora_tools.io.checkpoint import BaseCheckpoint

    started = time.perf_counter()
    policy, policy_name = check_options(rank, energy, sv_ratio, budget, min_rank, method, out_format, dtype)
    gpu = _gpu(device)
    wanted, unwanted = _compile(modules, "--modules"), _compile(exclude, "--exclude")
    whole = _compile(full_modules if full_modules is not None else DEFAULT_FULL_MODULES, "--full-modules")
    where_base, where_tuned = os.fspath(base_path), os.fspath(tuned_path)
    matrices: list[_Matrix] = []
    built: list[tuple[LayerExtractReport, np.ndarray, np.ndarray]] = []  # per matrix: figures, b, a
    full: dict[str, np.ndarray] = {}
    full_dtypes: dict[str, str] = {}
    unchanged = 0
    with BaseCheckpoint.open(base_path) as base, BaseCheckpoint.open(tuned_path) as tuned:
        keys = _pairs_agree(base, tuned, where_base, where_tuned)
        if progress is not None:
            progress.start(len(keys), 2 * sum(base.info(k).nbytes for k in keys), "extracting")
        def read(key: str) -> tuple[str, Any, Any]:
            """What `key` is and its data: read on a worker thread while the previous pair
            is decomposed (reads, widening and LAPACK all release the GIL)."""
            module = key.rpartition(".")[0]
            if (wanted is not None and not wanted.search(module)) or (unwanted is not None and unwanted.search(module)):
                return "skipped", None, None
            if _same_bytes(base, tuned, key):  # most of a fine-tune's tensors, embeddings too: compared, not widened
                return "unchanged", None, None
            shape = base.info(key).shape
            if not key.endswith(".weight") or len(shape) < 2 or (whole is not None and whole.search(module)):
                return "full", tuned.numpy(key), tuned.info(key).dtype
            return ("matrix", *_pair(base, tuned, key, gpu))

        # on a GPU the next pair is read while this one is decomposed; on the CPU the BLAS
        # threads already use every core, and a second pair in memory only costs memory
        pairs = _read_ahead(read, keys) if gpu is not None else ((key, read(key)) for key in keys)
        for key, (kind, d, extra) in pairs:
            if progress is not None:
                progress.advance(1, 2 * base.info(key).nbytes)
            unchanged += kind == "unchanged"
            if kind == "full":
                full[key], full_dtypes[key] = d, extra
            if kind != "matrix":
                continue
            module = key.rpartition(".")[0]
            how = method if method != "auto" else ("exact" if min(d.shape) <= EXACT_UP_TO else "randomized")
            matrix = _Matrix(module, key, tuple(base.info(key).shape), how, Spectrum(np.zeros(0), 0.0, False), extra)
            if budget is None:  # one SVD: the policy's rank and the factors
                matrix.spec, u, sigma, vt = decompose(d, how, policy, 0)
                k = choose_rank(matrix.spec, policy)
                built.append((report(module, d.shape, matrix.spec, sigma, k, matrix.base_fro, how), *balanced(u, sigma, vt, k)))
            else:  # the spectra first; the factors once every layer's rank is known
                matrix.spec = spectrum(d, how, policy, 0)
            matrices.append(matrix)
            del d
        if not matrices and not full:
            raise RequestError(tuned_path, f"TUNED equals BASE ({where_base}): nothing to extract")
        if not matrices:
            raise RequestError(tuned_path, f"no weight matrix differs from BASE (only {', '.join(sorted(full)[:3])}): "
                                           "nothing for a LoRA")
        if budget is not None:
            for matrix, k in zip(matrices, _ranks(matrices, policy, budget)):
                d, _ = _pair(base, tuned, matrix.key, gpu)
                spec, u, sigma, vt = decompose(d, matrix.method, policy, 0, k)
                built.append((report(matrix.name, d.shape, matrix.spec, sigma, k, matrix.base_fro, matrix.method),
                              *balanced(u, sigma, vt, k)))
        reports = [item[0] for item in built]
        layers = [_layer(matrix, b, a, DTYPES[dtype]) for matrix, (_, b, a) in zip(matrices, built)]
    code = DTYPES[dtype]
    notes = []
    with written_atomically(out, force, [Path(base_path), Path(tuned_path)]) as tmp:
        if out_format == "kohya":
            from lora_tools.formats.kohya import write_kohya

            write_kohya(layers, tmp, dtype=code, component="unet", metadata={"lora_tools.extract": policy_name})
            if full:
                notes.append(f"kohya files hold no full tensors: left out {', '.join(sorted(full))}")
        else:
            _write_peft(layers, full, full_dtypes, tmp, where_base, code)
    total_sq = sum(r.diff_fro**2 for r in reports)
    lost_sq = sum(r.residual_fro**2 for r in reports)
    worst = max(reports, key=lambda r: r.relative_error)
    params = sum(layer.n_params for layer in layers) + (sum(t.size for t in full.values()) if out_format == "peft" else 0)
    return ExtractReport(
        base=where_base, tuned=where_tuned, out=os.fspath(out), format=out_format, dtype=code, method=method,
        policy=policy_name, n_layers=len(layers), full_tensors=sorted(full) if out_format == "peft" else [],
        unchanged=unchanged, params=params,
        energy_kept=1.0 - lost_sq / total_sq if total_sq > 0 else 1.0,
        relative_error=math.sqrt(lost_sq / total_sq) if total_sq > 0 else 0.0,
        worst_layer=worst.name, worst_relative_error=worst.relative_error, notes=notes,
        seconds=time.perf_counter() - started, layers=reports,
    )


# bytes compared at a time: two buffers of this size, whatever the tensor's
_COMPARE_BLOCK = 16 << 20


def _same_bytes(base: Any, tuned: Any, key: str) -> bool:
    """Whether the two files store the same bytes for `key` (same dtype), block by block."""
    first, second = base.info(key), tuned.info(key)
    if first.dtype != second.dtype:
        return False
    left, right = bytearray(min(_COMPARE_BLOCK, first.nbytes)), bytearray(min(_COMPARE_BLOCK, first.nbytes))
    for offset in range(0, first.nbytes, _COMPARE_BLOCK):
        size = min(_COMPARE_BLOCK, first.nbytes - offset)
        a, b = memoryview(left)[:size], memoryview(right)[:size]
        base.shard_of(key).read_into(key, a, offset)
        tuned.shard_of(key).read_into(key, b, offset)
        if a != b:
            return False
    return True


def _read_ahead(read: Callable[[str], Any], keys: list[str]) -> Iterator[tuple[str, Any]]:
    """(key, read(key)) in order, the next key read on a worker thread while the caller
    works on this one: reading overlaps decomposing, and at most two pairs are in memory."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, keys[0]) if keys else None
        for index, key in enumerate(keys):
            assert pending is not None
            result = pending.result()
            pending = pool.submit(read, keys[index + 1]) if index + 1 < len(keys) else None
            yield key, result


def _gpu(device: str) -> Any:
    """The torch device for the SVDs, or None for numpy on the CPU. "auto" on a machine
    without an NVIDIA driver stays on numpy without importing torch (1.5 s and ~200 MB)."""
    if device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl")):
        return None
    from lora_tools.linalg.device import resolve_device

    resolved = resolve_device(device)
    return None if resolved.type == "cpu" else resolved


def _pair(base: Any, tuned: Any, key: str, gpu: Any) -> tuple[Any, float]:
    """(D, ‖W_base‖_F): D as float64 numpy, or a float64 tensor on `gpu`."""
    if gpu is None:
        w0 = base.numpy(key)
        return _difference(w0, tuned.numpy(key)), _norm64(w0)
    import torch

    from lora_tools.linalg.device_svd import difference

    w0 = base.torch(key)
    return difference(w0, tuned.torch(key), gpu), float(torch.linalg.vector_norm(w0.to(gpu, torch.float64)))


def _norm64(w: np.ndarray) -> float:
    """‖W‖_F accumulated in float64 without a widened copy (einsum casts in buffers)."""
    flat = w.reshape(-1)
    return math.sqrt(float(np.einsum("i,i->", flat, flat, dtype=np.float64)))


def _difference(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """D = W_tuned − W_base in float64 as a matrix (out, in·k): exact for stored floats;
    one pass, the operands widened inside the subtraction."""
    return np.subtract(w1, w0, dtype=np.float64).reshape(w0.shape[0], -1)


def _ranks(matrices: list[_Matrix], policy: RankPolicy, budget: int | None) -> list[int]:
    if budget is None:
        return [choose_rank(m.spec, policy) for m in matrices]
    costs = [m.shape[0] + math.prod(m.shape[1:]) for m in matrices]
    try:
        return budget_ranks([m.spec.singular_values for m in matrices], costs, budget, cap=policy.rank,
                            min_rank=policy.min_rank)
    except ValueError as error:
        raise RequestError(None, f"--budget: {error}") from None


def _layer(matrix: _Matrix, b: np.ndarray, a: np.ndarray, code: str) -> LoraLayer:
    """The factors as a LoRA layer with alpha = r (scale 1); conv kernels in PEFT's layout."""
    k = a.shape[0]
    kernel = matrix.shape[2:]
    if kernel:
        b, a = b.reshape(b.shape[0], k, *(1,) * len(kernel)), a.reshape(k, matrix.shape[1], *kernel)
    return LoraLayer(name=matrix.name, a=a, b=b, alpha=float(k), kind="conv" if kernel else "linear", dtype=code)


def _write_peft(layers: list[LoraLayer], full: dict[str, np.ndarray], full_dtypes: dict[str, str], tmp: Path,
                base: str, code: str) -> None:
    from lora_tools.formats.peft import write_peft_adapter
    from lora_tools.formats.rewrite import common_dtype

    biases = {k: v for k, v in full.items() if k.endswith(".bias")}
    whole = {k: v for k, v in full.items() if k not in biases}
    extra: dict[str, Any] = {"modules_to_save": sorted({k.rpartition(".")[0] for k in whole}) or None}
    if biases:
        extra["bias"] = "all"
    write_peft_adapter(layers, tmp, base, dtype=code, full_tensors=full,
                       full_tensor_dtype=common_dtype(list(full_dtypes.values())) if full_dtypes else None,
                       config_extra=extra, metadata={"lora_tools.extract": "1"})
