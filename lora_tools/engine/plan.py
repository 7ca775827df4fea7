"""Binding adapters to a base checkpoint: which base tensor receives what.

merge and verify both start here, so a checkpoint is judged against exactly the
recipe that would have produced it. The plan holds only small things (factors and
names); base tensors are read later, one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, Factor
from lora_tools.engine.binding import LayerTarget, fit_to_base
from lora_tools.engine.weights import check_weights
from lora_tools.errors import FormatError, MismatchError, RequestError
from lora_tools.formats import load_adapter
from lora_tools.formats.names import resolve_names
from lora_tools.formats.source import Place, keep_numpy
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.dtypes import FLOAT_DTYPES


@dataclass
class TensorPlan:
    """Everything that changes one base tensor, in the order it is applied:
    a whole replacement first (modules_to_save), then each adapter's layer, in the
    order the adapters were given."""

    name: str
    replacement: tuple[Factor, float] | None = None  # (tensor, weight)
    layers: list[tuple[LayerTarget, float]] = field(default_factory=list)
    biases: list[tuple[LayerTarget, float]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # adapter paths, for messages


def is_plain(plan: TensorPlan) -> bool:
    """Only untransposed LoRA layers to add: no replacement, no DoRA (whose norms need W0
    whole), no bias, no transposed update (rows of ΔW would not be rows of W). Such a
    tensor can be merged, and verified, one block of rows at a time."""
    return (
        plan.replacement is None
        and not plan.biases
        and bool(plan.layers)
        and all(t.layer.magnitude is None and not t.transposed for t, _ in plan.layers)
    )


@dataclass
class MergePlan:
    base: BaseCheckpoint
    adapters: list[Adapter]
    weights: list[float]
    tensors: dict[str, TensorPlan]  # only the base tensors something changes

    @property
    def n_layers(self) -> int:
        return sum(len(a.layers) for a in self.adapters)

    def close(self) -> None:
        self.base.close()


def normalize_weights(weights: list[float] | None, n_adapters: int, where: Any) -> list[float]:
    if not weights:
        return [1.0] * n_adapters
    if len(weights) != n_adapters:
        raise RequestError(
            where, f"got {len(weights)} --weight value(s) for {n_adapters} adapter(s); give one per adapter or none"
        )
    return [float(w) for w in weights]


def _shape(base: BaseCheckpoint, key: str) -> tuple[int, ...] | None:
    return tuple(base.info(key).shape) if base.has(key) else None


def bind_adapters(base: BaseCheckpoint, adapters: list[Adapter], weights: list[float]) -> dict[str, TensorPlan]:
    """Resolve names, fit shapes, and gather the per-tensor plan (errors name the adapter)."""
    base_label = os.fspath(base.path)
    modules = base.module_paths()
    plans: dict[str, TensorPlan] = {}

    def plan_for(key: str) -> TensorPlan:
        return plans.setdefault(key, TensorPlan(key))

    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        if adapter.unrecognized_keys:
            raise FormatError(
                adapter.path,
                f"{len(adapter.unrecognized_keys)} tensor(s) not understood (first {adapter.unrecognized_keys[0]!r}); "
                "refusing to merge only part of an adapter",
            )
        adapter = resolve_names(adapter, modules, base_label)
        adapters[index] = adapter
        for target in fit_to_base(adapter, lambda k: _shape(base, k), base_label, base.value_dtype):
            plan = plan_for(target.weight_key)
            plan.layers.append((target, weight))
            plan.sources.append(adapter.path)
            if target.layer.bias is not None:
                if not base.has(target.bias_key) and not _any_nonzero(target.layer.bias):
                    continue  # PEFT's lora_bias writes a zero bias for every layer, biasless ones too
                if not base.has(target.bias_key):
                    raise MismatchError(
                        adapter.path, f"layer {target.layer.name!r} has a LoRA bias but base {base_label} has no {target.bias_key!r}"
                    )
                if base.info(target.bias_key).dtype not in FLOAT_DTYPES:
                    raise MismatchError(
                        adapter.path, f"layer {target.layer.name!r}: base bias {target.bias_key!r} in {base_label} "
                        f"is {base.info(target.bias_key).dtype}, not a float tensor"
                    )
                plan_for(target.bias_key).biases.append((target, weight))
        for key, tensor in adapter.full_tensors.items():
            plan = plan_for(key)
            if plan.replacement is not None:
                raise RequestError(adapter.path, f"tensor {key!r} is replaced by more than one adapter (modules_to_save)")
            plan.replacement = (tensor, weight)
            plan.sources.append(adapter.path)
    return plans


def make_plan(
    base_path: str | os.PathLike[str],
    adapter_paths: list[str | os.PathLike[str]],
    weights: list[float] | None = None,
    *,
    alpha: float | None = None,
    place: Place = keep_numpy,
) -> MergePlan:
    """Open the base and every adapter, and bind them; the caller closes the plan.

    `place`: what the plan holds of each factor (numpy arrays by default; merge and
    verify ask for torch tensors on their compute device)."""
    if not adapter_paths:
        raise RequestError(None, "no adapter given")
    check_weights(weights, adapter_paths)  # before the count: it names the adapter a bad weight belongs to
    weights = normalize_weights(weights, len(adapter_paths), Path(adapter_paths[0]))
    base = BaseCheckpoint.open(base_path)
    try:
        adapters = [load_adapter(p, alpha=alpha, place=place) for p in adapter_paths]
        tensors = bind_adapters(base, adapters, weights)
    except BaseException:
        base.close()
        raise
    return MergePlan(base, adapters, weights, tensors)


def _any_nonzero(tensor: object) -> bool:
    """Whether a numpy array or torch tensor has a non-zero element."""
    any_of = getattr(tensor, "any", None)
    return bool(any_of()) if any_of is not None else True
