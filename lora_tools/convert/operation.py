"""`convert`: one adapter written in another format, the update unchanged, and proven so
by reading the file back (`proof`).

Every format's scale rule can hold any layer's scale except GGUF's (one alpha, alpha/r
per layer), where the writer folds it into the factors: PEFT and diffusers keep alpha with
rank_pattern/alpha_pattern/use_rslora, kohya gets alpha = s·r per module. What a target
cannot hold at all (a LoRA bias or embedding in kohya; DoRA, biases, conv and full
tensors in GGUF; full tensors outside PEFT) is refused with the first such layer named,
or left out with `drop_unsupported` and listed. Names go through `naming`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.convert.naming import Location, kohya_component, output_names, split_component
from lora_tools.convert.options import DTYPES, TARGETS
from lora_tools.convert.proof import LayerProof, prove_layer
from lora_tools.errors import RequestError


@dataclass
class ConvertReport:
    adapter: str
    out: str
    from_format: str
    to_format: str
    dtype: str
    base: str | None
    n_layers_in: int
    n_layers_out: int
    dropped: list[str]  # "name: why", layers and full tensors the target cannot hold (drop_unsupported), or other components
    exact: bool  # every written layer holds what was asked (see proof)
    first_difference: str | None  # the first layer that does not, when not exact
    max_relative_error: float  # over layers, ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F
    gguf_architecture: str | None
    gguf_alpha: float | None
    notes: list[str]
    seconds: float
    layers: list[LayerProof]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# What each target cannot hold: (target, the layer has it, why), first match reported.
_LIMITS: list[tuple[str, Callable[[LoraLayer], bool], str]] = [
    ("gguf", lambda layer: layer.magnitude is not None, "DoRA has no GGUF form (llama.cpp applies plain LoRA)"),
    ("gguf", lambda layer: layer.bias is not None, "a LoRA bias has no GGUF form"),
    ("gguf", lambda layer: layer.kind == "conv", "a conv LoRA has no GGUF form"),
    ("gguf", lambda layer: layer.fan_in_fan_out, "fan_in_fan_out (Conv1D) layers are not mapped to GGUF"),
    ("kohya", lambda layer: layer.bias is not None, "kohya files hold no LoRA bias"),
    ("kohya", lambda layer: layer.kind == "embedding", "kohya files hold no embedding LoRA"),
    ("kohya", lambda layer: layer.fan_in_fan_out, "kohya files hold no fan_in_fan_out (Conv1D) layers"),
]


def _unsupported(layer: LoraLayer, target: str) -> str | None:
    """Why `target` cannot hold this layer, or None."""
    return next((why for where, has, why in _LIMITS if where == target and has(layer)), None)


def _locations(adapter: Adapter, base: str | os.PathLike[str] | None) -> tuple[list[Location], Adapter | None]:
    """Each layer's module and component; with a base, every layer's fit is checked and
    kohya names are resolved (the resolved adapter is returned for the GGUF writer)."""
    resolved = None
    if base is not None:
        from lora_tools.engine.binding import fit_to_base
        from lora_tools.formats.names import resolve_names
        from lora_tools.io.checkpoint import BaseCheckpoint

        where = os.fspath(base)
        with BaseCheckpoint.open(base) as checkpoint:
            resolved = resolve_names(adapter, checkpoint.module_paths(), where)
            fit_to_base(resolved, lambda k: checkpoint.info(k).shape if checkpoint.has(k) else None, where,
                        lambda k: checkpoint.info(k).dtype)
    locations = []
    for index, layer in enumerate(adapter.layers):
        if adapter.format == "kohya":
            component = kohya_component(layer.name)[1]
            module = resolved.layers[index].name if resolved is not None else None
            locations.append(Location(module, component, layer.name))
        elif adapter.format == "diffusers":
            locations.append(Location(*reversed(split_component(layer.name))))
        else:
            locations.append(Location(layer.name, None))
    return locations, resolved


def check_options(to: str, dtype: str) -> None:
    if to not in TARGETS:
        raise RequestError(None, f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if dtype not in DTYPES:
        raise RequestError(None, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def convert(
    adapter_path: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str,
    base: str | os.PathLike[str] | None = None, prefix: str | None = None, component: str | None = None,
    dtype: str = "keep", drop_unsupported: bool = False, force: bool = False,
) -> ConvertReport:
    """Read ADAPTER, write it as `to` at OUT atomically, read OUT back and prove each layer."""
    from lora_tools.formats import load_adapter
    from lora_tools.formats.rewrite import common_dtype, write_like
    from lora_tools.io.atomic import written_atomically

    started = time.perf_counter()
    check_options(to, dtype)
    if to == "gguf":
        from lora_tools.formats.gguf import GGUF_INSTALL_HINT, gguf_available

        if base is None:
            raise RequestError(out, "--to gguf needs --base: the base's config.json names the architecture and its tensors")
        if not gguf_available():
            raise RequestError(out, f"--to gguf needs the gguf package: {GGUF_INSTALL_HINT}")
    adapter = load_adapter(adapter_path)
    locations, resolved = _locations(adapter, base)
    dropped: list[str] = []
    keep = list(range(len(adapter.layers)))
    if component is not None:
        keep = [i for i in keep if locations[i].component == component]
        if not keep:
            present = sorted({str(loc.component) for loc in locations})
            raise RequestError(adapter_path, f"has no layers of component {component!r} (it has {', '.join(present)})")
        dropped += [f"{adapter.layers[i].name}: component {locations[i].component}"
                    for i in range(len(adapter.layers)) if i not in keep]
    for i in list(keep):
        why = _unsupported(adapter.layers[i], to)
        if why is not None:
            if not drop_unsupported:
                raise RequestError(adapter_path, f"layer {adapter.layers[i].name!r}: {why} (--drop-unsupported writes the rest)")
            keep.remove(i)
            dropped.append(f"{adapter.layers[i].name}: {why}")
    if adapter.full_tensors and to != "peft":
        first_full = sorted(adapter.full_tensors)[0]
        if not drop_unsupported:
            raise RequestError(adapter_path, f"full tensor {first_full!r} (modules_to_save) has no {to} form "
                                             "(--drop-unsupported writes the rest)")
        dropped += [f"{key}: a full tensor has no {to} form" for key in sorted(adapter.full_tensors)]
    if not keep:
        raise RequestError(adapter_path, f"no layer can be written as {to}")
    try:
        names = output_names([locations[i] for i in keep], to, prefix)
    except ValueError as error:
        raise RequestError(adapter_path, str(error)) from None
    if len(set(names)) != len(names):
        raise RequestError(adapter_path, f"two layers would both be written as {names[len(set(names))]!r}")
    sources = [adapter.layers[i] for i in keep]
    code = DTYPES[dtype] or common_dtype([layer.dtype for layer in sources])
    # written as what they are exactly: LoRA factors (LoHa, LoKr, Tucker and full diffs built out)
    layers = [replace(layer, name=name, algo="lora", stored_params=None, kron_sides=None, hadamard_sides=None)
              for layer, name in zip(sources, names)]
    metadata = {"lora_tools.convert": json.dumps({"from": adapter.format, "to": to, "input": Path(adapter_path).name})}
    notes: list[str] = []
    gguf_arch, gguf_alpha, folded, base_config = None, None, set(), None
    with written_atomically(out, force, [Path(adapter_path)] + ([Path(base)] if base is not None else [])) as tmp:
        if to == "gguf":
            assert base is not None and resolved is not None
            from lora_tools.formats.gguf import write_gguf_adapter
            from lora_tools.io.hf_layout import read_base_config

            base_config = read_base_config(base)  # once: the writer and the proof both need it
            written = write_gguf_adapter([replace(layer, name=resolved.layers[i].name) for i, layer in zip(keep, layers)],
                                         tmp, base_config=base_config, dtype=code, metadata=metadata)
            gguf_arch, gguf_alpha, folded = written.architecture, written.alpha, set(written.folded)
        else:
            if adapter.full_tensors and to == "peft" and adapter.format != "peft":
                notes.append("full tensors are only carried from a PEFT input")
            write_like(adapter if component is None else replace(adapter, full_tensors={}), layers, tmp, to, code,
                       dropped=bool(dropped), metadata=metadata,
                       base_model=os.fspath(base) if base is not None and to == "peft" else None)
    proofs = _prove(Path(out), to, sources, names, code, folded, resolved, keep, base_config)
    if to == "kohya" and len({float(layer.scale * layer.rank) for layer in layers}) > 1:
        notes.append("per-module alphas differ: diffusers' kohya loader gives attention layers the most common alpha "
                     "(see docs/formats.md)")
    first = next((p for p in proofs if not p.exact), None)
    errors = [p.relative_error for p in proofs if math.isfinite(p.relative_error)]
    return ConvertReport(
        adapter=os.fspath(adapter_path), out=os.fspath(out), from_format=adapter.format, to_format=to, dtype=code,
        base=None if base is None else os.fspath(base), n_layers_in=len(adapter.layers), n_layers_out=len(layers),
        dropped=dropped, exact=first is None, first_difference=None if first is None else first.name,
        max_relative_error=max(errors, default=0.0), gguf_architecture=gguf_arch, gguf_alpha=gguf_alpha, notes=notes,
        seconds=time.perf_counter() - started, layers=proofs,
    )


def _prove(out: Path, to: str, sources: Sequence[LoraLayer], names: Sequence[str], code: str, folded: set[str],
           resolved: Adapter | None, keep: Sequence[int], base_config: dict[str, Any] | None) -> list[LayerProof]:
    """Read OUT back with lora-tools' own readers and compare every layer with its source."""
    if to == "gguf":
        from lora_tools.formats.gguf import read_gguf_adapter

        assert resolved is not None and base_config is not None
        modules = [resolved.layers[i].name for i in keep]
        written = read_gguf_adapter(out, modules, base_config=base_config)
        return [prove_layer(source, written.get(module), name, code, module in folded)
                for source, module, name in zip(sources, modules, names)]
    from lora_tools.formats import load_adapter

    layers = {layer.name: layer for layer in load_adapter(out).layers}
    return [prove_layer(source, layers.get(name), name, code, False) for source, name in zip(sources, names)]
