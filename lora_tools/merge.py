"""`merge`: fold adapters into a base checkpoint, streaming one tensor at a time.

The output has the base's layout (shard names, index, metadata, every non-weight
file). Tensors no adapter touches are copied as raw bytes; adapted ones are computed
in float32 on the chosen device from W0 and the factors, and rounded once to the stored
dtype. Everything is written under a temporary sibling and renamed at the very end.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lora_tools.io.atomic import atomic_output, copy_extra_files, wrap_write_errors
from lora_tools.linalg.dense import apply_bias, apply_layer, factor_tensor, factors_on, merge_rows_into
from lora_tools.errors import FormatError, LoraToolsError, UsageError
from lora_tools.io.stream_writer import SafetensorsStreamWriter, file_layout
from lora_tools.engine.pipeline import OrderedWriter, prefetched
from lora_tools.engine.plan import MergePlan, TensorPlan, make_plan
from lora_tools.io.safetensors_file import DTYPE_ITEMSIZE, FLOAT_DTYPES, SafetensorsFile
from lora_tools.engine.staging import ByteRing, staging_for
from lora_tools.io.dtypes import DTYPE_ALIASES, torch_dtype

INDEX_NAME = "model.safetensors.index.json"
# Row blocks of about this many elements (16 MiB of float32) on the CPU: large enough
# that torch's per-operation thread hand-offs cost nothing, small enough that the passes
# of a merge reuse warm buffers. Measured at 1B shapes on two cores (whole merge):
# 3.8-3.9 s with 4 M, 4.0-4.4 s with 1 M. On a GPU a tensor is one block.
CPU_CHUNK_ELEMENTS = 4 * 1024 * 1024
# Tensors loaded ahead of the one being computed, and results queued for the writer.
# The writer waits on the disk in bursts (a shard's untouched tensors, the disk's own
# stalls); a deep queue lets the computation run on meanwhile instead of waiting with
# it. Measured at 1B shapes on 2 cores: 3.0 s with 2, 2.5 s with 6-8. Memory: on the
# CPU, WRITE_BEHIND + 1 results of at most the largest adapted tensor each.
READ_AHEAD = 2
WRITE_BEHIND = 6


class Progress(Protocol):
    """Where a long operation reports how far it got (the CLI draws a bar)."""

    def start(self, total_tensors: int, total_bytes: int) -> None: ...

    def advance(self, tensors: int, nbytes: int) -> None: ...


@dataclass
class MergeResult:
    out: str
    device: str
    n_tensors: int
    n_adapted: int  # tensors computed from an adapter (weights, biases, replacements)
    n_copied: int  # tensors copied byte for byte
    n_layers: int  # adapter layers folded in
    bytes_written: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when present, else the CPU; "cuda:N" must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UsageError(None, f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(None, f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(None, f"device {device!r} does not exist ({torch.cuda.device_count()} GPU(s))")
    elif resolved.type != "cpu":
        raise UsageError(None, f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return resolved


def output_dtype_code(dtype: str) -> str | None:
    """None for "keep", else the safetensors code every float tensor is stored in."""
    if dtype == "keep":
        return None
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise UsageError(None, f"unknown --dtype {dtype!r} (use keep, bf16, fp16 or fp32)") from None


def accumulation_dtype(w0: torch.dtype, stored: torch.dtype) -> torch.dtype:
    """float32 accumulates every narrower dtype exactly enough; a float64 weight (or
    output) would lose 29 bits of every element to it."""
    return torch.float64 if torch.float64 in (w0, stored) else torch.float32


def is_plain(plan: TensorPlan) -> bool:
    """Only untransposed LoRA layers to add: no replacement, no DoRA (whose norms need W0
    whole), no bias, no transposed update (rows of ΔW would not be rows of W)."""
    return (
        plan.replacement is None
        and not plan.biases
        and bool(plan.layers)
        and all(t.layer.magnitude is None and not t.transposed for t, _ in plan.layers)
    )


def merged_tensor(plan: TensorPlan, w0: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """W0 with a replacement, every adapter layer and every LoRA bias folded in.

    `w0` is on the compute device in its stored dtype; the result is in compute_dtype.
    Verify recomputes with this in float64; merge uses it for everything but its
    plain-LoRA hot path (`dense.merge_rows_into`), which does the same operations.
    """
    base = w0.to(compute_dtype)
    if plan.replacement is not None:
        tensor, weight = plan.replacement
        full = factor_tensor(tensor, base.device, compute_dtype).reshape(base.shape)
        base = full if weight == 1.0 else base + (full - base) * weight
    current = base
    for target, weight in plan.layers:
        current = apply_layer(current, base, target, weight)
    for target, weight in plan.biases:
        current = apply_bias(current, target, weight)
    return current


def merge(
    base_path: str | os.PathLike[str],
    adapter_paths: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: list[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    alpha: float | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Write BASE + Σ wᵢ·ΔWᵢ to `out` in BASE's layout; see the module docstring."""
    started = time.perf_counter()
    out = Path(out)
    target_device = resolve_device(device)
    out_code = output_dtype_code(dtype)
    plan = make_plan(base_path, adapter_paths, weights, alpha=alpha, place=factors_on(target_device))
    inputs = [Path(base_path), *map(Path, adapter_paths)]
    try:
        streamer = _Streamer(plan, target_device, out_code, progress)
        with wrap_write_errors(out), atomic_output(out, force, inputs) as tmp:
            if plan.base.is_dir:
                tmp.mkdir()
                copy_extra_files(plan.base.path, plan.base.extra_files(), tmp)
                streamer.write_files([(plan.base.shard(name), tmp / name) for name in plan.base.shard_names])
                _write_index(plan, tmp, out_code)
                _update_config_dtype(tmp, out_code)
            else:
                streamer.write_files([(plan.base.shard(plan.base.shard_names[0]), tmp)])
    finally:
        plan.close()
    return MergeResult(
        out=os.fspath(out),
        device=str(target_device),
        n_tensors=streamer.n_adapted + streamer.n_copied,
        n_adapted=streamer.n_adapted,
        n_copied=streamer.n_copied,
        n_layers=plan.n_layers,
        bytes_written=streamer.bytes_written,
        seconds=time.perf_counter() - started,
    )


_CONFIG_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _update_config_dtype(tmp: Path, out_code: str | None) -> None:
    """After --dtype, config.json must say the dtype the weights now have.

    transformers reads `torch_dtype` (`dtype` since v5) to pick the load dtype with
    dtype="auto"; a stale float32 there would upcast a bf16 merge on load.
    """
    config_path = tmp / "config.json"
    if out_code is None or not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # JSONDecodeError, 5000-digit ints, deep nesting
        return  # not ours to judge: it was copied byte for byte
    if not isinstance(config, dict):
        return
    name = _CONFIG_DTYPE_NAMES[out_code]
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_index(plan: MergePlan, tmp: Path, out_code: str | None) -> None:
    """The index: copied as is, unless a dtype change alters total_size.

    total_size is what transformers writes: the bytes of the tensors, headers excluded.
    """
    source = plan.base.path / INDEX_NAME
    if not source.exists():
        return
    if out_code is None:
        copy_extra_files(plan.base.path, [INDEX_NAME], tmp)
        return
    index = json.loads(source.read_text(encoding="utf-8"))
    total = 0
    for name in plan.base.tensor_names():
        info = plan.base.info(name)
        code = out_code if info.dtype in FLOAT_DTYPES else info.dtype
        total += info.numel * DTYPE_ITEMSIZE[code]
    index.setdefault("metadata", {})["total_size"] = total
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _Streamer:
    """Streams the shards of one merge; counts what it did.

    Three threads: the reader loads the tensors to compute (up to READ_AHEAD ahead), the
    calling thread computes, the writer writes results and copies the untouched tensors
    (in the kernel). The staging (see `staging`) decides where tensors live meanwhile.
    """

    def __init__(self, plan: MergePlan, device: torch.device, out_code: str | None, progress: Progress | None) -> None:
        self.plan = plan
        self.device = device
        self.out_code = out_code
        self.progress = progress
        self.n_adapted = self.n_copied = self.bytes_written = 0
        # Loads alive at once: READ_AHEAD queued or being read, one being computed.
        # Results alive: WRITE_BEHIND queued or being written, one being computed.
        self.staging = staging_for(device, READ_AHEAD + 1, WRITE_BEHIND + 1)
        # The row blocks' compute buffers, reused for every tensor.
        self.work = ByteRing(1, device)
        self.widened = ByteRing(1, device)
        if progress is not None:
            infos = [plan.base.info(name) for name in plan.base.tensor_names()]
            progress.start(len(infos), sum(i.nbytes for i in infos))

    def _stored_code(self, code: str) -> str:
        return self.out_code if self.out_code is not None and code in FLOAT_DTYPES else code

    def write_files(self, files: list[tuple[SafetensorsFile, Path]]) -> None:
        """Write every (source shard, output file) pair, as one pipeline: the reader and
        the writer run on across shard boundaries instead of draining at each one."""
        layouts = [[(name, self._stored_code(code), shape) for name, code, shape in file_layout(src)] for src, _ in files]
        items = [(index, name) for index, entries in enumerate(layouts) for name, _, _ in entries]
        last_of_file = {(index, entries[-1][0]) for index, entries in enumerate(layouts) if entries}
        codes = [{name: code for name, code, _ in entries} for entries in layouts]

        def load(item: tuple[int, str]) -> torch.Tensor | None:
            index, name = item
            src = files[index][0]
            if name not in self.plan.tensors and codes[index][name] == src.info(name).dtype:
                return None  # copied as is, by the writer
            # a dtype change only: not worth growing the reused buffers to a 500 MB embedding
            return self.staging.load(src, name, reuse=name in self.plan.tensors)

        with contextlib.ExitStack() as open_files, OrderedWriter(WRITE_BEHIND) as jobs:
            writers: dict[int, SafetensorsStreamWriter] = {}
            for index, (src, dst) in enumerate(files):
                if not layouts[index]:  # a shard without tensors: its header is all there is
                    with SafetensorsStreamWriter(dst, [], src.metadata):
                        pass
            for (index, name), w0 in prefetched(items, load, READ_AHEAD):
                src, dst = files[index]
                if index not in writers:
                    writers[index] = open_files.enter_context(SafetensorsStreamWriter(dst, layouts[index], src.metadata))
                writer = writers[index]
                if w0 is None:
                    jobs.submit(self._copy_job(writer, src, name, src.info(name).nbytes))
                    self.n_copied += 1
                else:
                    result = self._compute(name, w0, torch_dtype(codes[index][name]))
                    jobs.submit(self._write_job(writer, name, result))
                    self.n_adapted += name in self.plan.tensors
                    self.n_copied += name not in self.plan.tensors
                if (index, name) in last_of_file:
                    jobs.submit(writer.close)  # fsync on the writer thread, in order

    def _compute(self, name: str, w0: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
        """The merged tensor in its stored dtype, in a buffer the writer may keep."""
        plan = self.plan.tensors.get(name)
        if plan is None:  # only a dtype change
            return w0.to(stored)
        out = self.staging.result_buffer(tuple(w0.shape), stored)
        compute = accumulation_dtype(w0.dtype, stored)
        if is_plain(plan):
            rows = w0.shape[0]
            width = w0[0].numel()
            chunk = rows if self.device.type == "cuda" else max(2, min(rows, CPU_CHUNK_ELEMENTS // max(1, width)))
            total = merge_rows_into(
                out.view(rows, width), w0.view(rows, width), plan.layers, chunk,
                self.work.tensor((min(rows, chunk + 1), width), compute),
                self.widened.tensor((min(rows, chunk + 1), width), compute),
                fuse=self.device.type == "cpu",
            )
            if not bool(torch.isfinite(total)) and not bool(torch.isfinite(out).all()):
                self._refuse_non_finite(name, plan, w0)
            return out
        merged = merged_tensor(plan, w0, compute)
        # one reduction instead of an element-wise isfinite pass
        if not bool(torch.isfinite(merged.sum())) and not bool(torch.isfinite(merged).all()):
            self._refuse_non_finite(name, plan, w0)
        return out.copy_(merged)  # the one rounding to the stored dtype

    def _refuse_non_finite(self, name: str, plan: TensorPlan, w0: torch.Tensor) -> None:
        if not bool(torch.isfinite(w0).all()):  # the base's fault, not the adapter's
            raise FormatError(self.plan.base.shard_of(name).path, f"tensor {name!r} contains NaN or Inf")
        raise LoraToolsError(plan.sources[0], f"merging into {name!r} produced NaN or Inf")

    def _copy_job(self, writer: SafetensorsStreamWriter, src: SafetensorsFile, name: str, nbytes: int) -> Callable[[], None]:
        def job() -> None:
            writer.copy_tensor(name, src)
            self._advance(nbytes)

        return job

    def _write_job(self, writer: SafetensorsStreamWriter, name: str, tensor: torch.Tensor) -> Callable[[], None]:
        def job() -> None:
            self.staging.write(writer, name, tensor)
            self._advance(tensor.numel() * tensor.element_size())

        return job

    def _advance(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        if self.progress is not None:
            self.progress.advance(1, nbytes)


def merge_summary(result: MergeResult) -> dict[str, Any]:
    return result.__dict__.copy()
