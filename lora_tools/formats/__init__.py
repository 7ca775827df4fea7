"""Reading adapters: detect the format of a path and parse it into an `Adapter`.

Key-name conventions live in this package and nowhere else: one module per format reads
and writes it (peft.py, kohya.py, diffusers.py, gguf.py; lycoris.py reads LyCORIS files into
exact LoRA layers), names.py maps names both ways.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.diffusers import (
    DIFFUSERS_WEIGHTS,
    METADATA_KEY,
    load_diffusers,
    looks_like_diffusers,
    looks_like_legacy_diffusers,
)
from lora_tools.formats.kohya import load_kohya, looks_like_kohya
from lora_tools.formats.lycoris import load_lycoris, looks_like_lycoris
from lora_tools.formats.peft import PEFT_CONFIG, load_peft, looks_like_peft, read_config
from lora_tools.formats.peft_lycoris import PEFT_LYCORIS_TYPES, load_peft_lycoris
from lora_tools.formats.source import Place, TensorSource, keep_numpy, open_source

__all__ = ["load_adapter"]

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def load_adapter(path: str | os.PathLike[str], *, alpha: float | None = None, place: Place = keep_numpy) -> Adapter:
    """Read an adapter folder or file in any supported format.

    `alpha` overrides every layer's alpha (for files that carry none, or carry a wrong one).
    `place` decides what the layers hold of each factor once it is checked: the numpy
    array by default, or whatever a caller that computes elsewhere wants (see `source.Place`).
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(path, "no such file or directory")
    if alpha is not None and not 0 < alpha < math.inf:
        raise FormatError(path, f"--alpha must be a positive finite number, got {alpha}")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):  # else its files would look absent
            raise FormatError(path, "permission denied")
        return _load_directory(path, alpha, place)
    if not os.access(path, os.R_OK):
        raise FormatError(path, "permission denied")
    return _load_file(path, alpha, place)


def _load_directory(path: Path, alpha: float | None, place: Place) -> Adapter:
    config_path = path / PEFT_CONFIG
    if config_path.is_file():
        for name in PEFT_WEIGHTS:
            if (path / name).is_file():
                config = read_config(config_path)
                source = open_source(path / name, place)
                try:  # readers copy every tensor they keep, so the file can close after
                    if config["peft_type"] in PEFT_LYCORIS_TYPES:
                        return load_peft_lycoris(source, config, adapter_path=path, alpha_override=alpha)
                    return load_peft(source, config, adapter_path=path, alpha_override=alpha)
                finally:
                    source.close()
        raise FormatError(path, f"has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return _load_file(path / DIFFUSERS_WEIGHTS, alpha, place)
    raise FormatError(path, f"not an adapter folder (no {PEFT_CONFIG} with {PEFT_WEIGHTS[0]})")


def _load_file(path: Path, alpha: float | None, place: Place) -> Adapter:
    source = open_source(path, place)
    try:  # readers copy every tensor they keep, so the file can close after
        return _read_source(path, source, alpha)
    finally:
        source.close()


def _read_source(path: Path, source: TensorSource, alpha: float | None) -> Adapter:
    keys = source.keys()
    sibling = path.parent / PEFT_CONFIG
    # PEFT keys saved without `base_model.model.` can start like a diffusers component
    # (GPT-2's `transformer.h.0…`); a sibling adapter_config.json says which they are.
    peft_with_config = looks_like_peft(keys) and sibling.is_file() and METADATA_KEY not in source.metadata
    if looks_like_lycoris(keys):  # before kohya: LyCORIS files hold kohya's LoRA keys too
        return load_lycoris(source, alpha_override=alpha)
    if looks_like_kohya(keys):
        return load_kohya(source, alpha_override=alpha)
    if not peft_with_config and (looks_like_legacy_diffusers(keys) or looks_like_diffusers(keys, source.metadata)):
        return load_diffusers(source, alpha_override=alpha)
    if looks_like_peft(keys):
        config = read_config(sibling) if sibling.is_file() else {"lora_alpha": None}
        return load_peft(source, config, adapter_path=path, alpha_override=alpha)
    if not keys:
        raise FormatError(path, "contains no tensors")
    sample = ", ".join(repr(k) for k in keys[:3])
    raise FormatError(
        path,
        f"unknown key format: no PEFT (lora_A/lora_B), kohya (lora_down/lora_up), LyCORIS (hada_, lokr_, diff) or diffusers LoRA keys (first keys: {sample})",
    )
