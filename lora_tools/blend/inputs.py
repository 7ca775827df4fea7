"""What may be blended, and how the inputs line up: options, weights, refusals, layer
alignment, and the policy for full tensors (modules_to_save and copies of base weights).

Every refusal is a LoraToolsError naming the file at fault, so the CLI prints one line
and exits 2 before anything is computed or written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lora_tools.adapter import Adapter, Factor, LoraLayer
from lora_tools.blend.factored import Term
from lora_tools.blend.options import DENSE_METHODS, DTYPES, FORMATS, METHODS
from lora_tools.errors import MismatchError, RequestError

# Weights of inputs with full tensors (modules_to_save) must sum to 1 within this.
WEIGHT_SUM_TOL = 1e-6


def check_options(method: str, rank: int | None, energy: float | None, density: float | None, out_format: str, dtype: str) -> None:
    """Refuse inconsistent options before any file is read."""
    if method not in METHODS:
        raise RequestError(None, f"unknown method {method!r} (use {', '.join(METHODS)})")
    if out_format not in FORMATS:
        raise RequestError(None, f"unknown format {out_format!r} (use {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise RequestError(None, f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if method in ("cat", "linear") and (rank is not None or energy is not None):
        raise RequestError(None, f"--rank and --energy apply to svd, ties and dare methods, not {method} (its rank is fixed)")
    if rank is not None and rank < 1:
        raise RequestError(None, f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise RequestError(None, f"--energy must lie in (0, 1], got {energy}")
    if method in DENSE_METHODS and density is None:
        raise RequestError(None, f"--method {method} needs --density (the share of entries kept, e.g. 0.5)")
    if method not in DENSE_METHODS and density is not None:
        raise RequestError(None, f"--density applies to ties and dare methods, not {method}")
    if density is not None and not 0.0 < density <= 1.0:
        raise RequestError(None, f"--density must lie in (0, 1], got {density}")


def resolve_weights(n_inputs: int, weights: Sequence[float]) -> list[float]:
    """One weight per input, or for two inputs one t meaning (1 − t, t) as torch.lerp."""
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise RequestError(None, f"weights must be finite numbers, got {weights}")
    if len(weights) == n_inputs:
        return weights
    if n_inputs == 2 and len(weights) == 1:
        return [1.0 - weights[0], weights[0]]
    raise RequestError(
        None,
        f"got {len(weights)} --weight for {n_inputs} adapters: give one per adapter"
        + (", or one t to interpolate (1 − t)·A + t·B" if n_inputs == 2 else ""),
    )


def check_inputs(adapters: Sequence[Adapter]) -> None:
    """Refuse what cannot be blended as low-rank updates, naming the file."""
    for adapter in adapters:
        dora = next((layer.name for layer in adapter.layers if layer.magnitude is not None), None)
        if dora is not None:
            raise RequestError(
                adapter.path,
                f"DoRA adapter (layer {dora!r} has a magnitude vector): its update m·(W0+ΔW)/‖W0+ΔW‖ − W0 "
                "is not low-rank and depends on the base, so it cannot be blended; merge it with `lora-tools merge`",
            )
        if adapter.unrecognized_keys:
            raise RequestError(
                adapter.path,
                f"{len(adapter.unrecognized_keys)} tensors not understood (first {adapter.unrecognized_keys[0]!r}); "
                "a blend would silently drop them",
            )
        if adapter.format not in ("peft", "kohya"):
            raise RequestError(adapter.path, f"{adapter.format} files cannot be blended yet (PEFT and kohya inputs can)")
    kohya = [a for a in adapters if not a.names_resolved]
    if kohya and len(kohya) != len(adapters):
        raise RequestError(
            kohya[0].path,
            "kohya layer names cannot be matched with PEFT module paths without a base; blend kohya files with kohya files",
        )


def _same_target(first: LoraLayer, layer: LoraLayer) -> bool:
    """Whether two layers can update the same base weight: the same B·A matrix and
    orientation, and the same kernel where both state one (LyCORIS stores some conv
    factors flattened, (r, in·kh·kw), which fits the same weight as (r, in, kh, kw))."""
    if (first.kind == "embedding", first.fan_in_fan_out) != (layer.kind == "embedding", layer.fan_in_fan_out):
        return False
    if first.kind == layer.kind == "conv":
        return first.weight_shape == layer.weight_shape
    return first.update_matrix_shape == layer.update_matrix_shape


def align_layers(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[Term]]:
    """Module name -> the inputs that adapt it, in input order; shapes must agree."""
    groups: dict[str, list[Term]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        for layer in adapter.layers:
            terms = groups.setdefault(layer.name, [])
            if terms:
                first = terms[0].layer
                if not _same_target(first, layer):
                    raise MismatchError(
                        adapter.path,
                        f"layer {layer.name!r} is {layer.kind} {list(layer.weight_shape)} but {first.kind} "
                        f"{list(first.weight_shape)} in {adapters[terms[0].index].path}: adapters for different base models",
                    )
            terms.append(Term(index, layer, weight))
    return groups


def base_copies(adapters: Sequence[Adapter]) -> dict[str, Factor]:
    """Full tensors of modules an input also adapts with LoRA: PEFT's copies of the base
    weight (save_embedding_layers, `….base_layer.weight`). They are W0, not updates, so
    they are carried over unchanged; copies that differ mean different bases."""
    copies: dict[str, tuple[Factor, str]] = {}
    for adapter in adapters:
        adapted = {layer.name for layer in adapter.layers}
        for key, tensor in adapter.full_tensors.items():
            if key.rpartition(".")[0] not in adapted:
                continue
            if key in copies and not np.array_equal(copies[key][0], tensor):
                raise MismatchError(adapter.path, f"its copy of the base weight {key!r} differs from the one in "
                                    f"{copies[key][1]}: adapters for different base models")
            copies.setdefault(key, (tensor, adapter.path))
    return {key: tensor for key, (tensor, _) in copies.items()}


def blend_full_tensors(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ·W'ᵢ for full replacement tensors (modules_to_save).

    A full tensor replaces the base weight W0, so its update is W'ᵢ − W0, and
    Σ wᵢ·W'ᵢ = W0 + Σ wᵢ·(W'ᵢ − W0) exactly when Σ wᵢ = 1 (interpolation). Any other
    case needs W0, which a blend does not read: refused rather than guessed.
    """
    copies = base_copies(adapters)
    replacing = [{k: v for k, v in a.full_tensors.items() if k not in copies} for a in adapters]
    if not any(replacing):
        return {}
    keys = sorted(set().union(*replacing))
    for adapter, tensors in zip(adapters, replacing):
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise RequestError(
                adapter.path,
                f"has no full tensor {missing[0]!r} (modules_to_save) that another input has; combining it "
                "needs the base weight it replaces: merge with `lora-tools merge` instead",
            )
    total = sum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        raise RequestError(
            adapters[0].path,
            f"carries full tensors ({keys[0]!r}, modules_to_save), which blend exactly only when the weights sum "
            f"to 1 (Σ wᵢ·W'ᵢ = W0 + Σ wᵢ·(W'ᵢ − W0)); the weights sum to {total:g}",
        )
    blended = {}
    for key in keys:
        shapes = {tensors[key].shape for tensors in replacing}
        if len(shapes) != 1:
            raise MismatchError(adapters[-1].path, f"full tensor {key!r} has shapes {sorted(shapes)}: different base models")
        mixed = np.zeros(shapes.pop())
        for tensors, w in zip(replacing, weights):
            mixed += w * np.asarray(tensors[key], dtype=np.float64)
        blended[key] = mixed
    return blended
