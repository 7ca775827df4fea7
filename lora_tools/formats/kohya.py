"""kohya sd-scripts LoRA files (`networks.lora`; LoCon conv layers too).

Key = module path with "." replaced by "_", prefixed `lora_unet_`, `lora_te_`,
`lora_te1_`/`lora_te2_`/`lora_te3_`; tensors `<name>.lora_down.weight` (r, in[, kh, kw]),
`<name>.lora_up.weight` (out, r[, 1, 1]) and `<name>.alpha` (0-d, any float dtype).
s = alpha / r with r = lora_down.shape[0]; a missing or zero alpha means alpha = r
(sd-scripts `LoRAModule.__init__`). Names stay kohya's until resolved against a base.
"""

from __future__ import annotations

import re

from lora_tools.adapter import Adapter
from lora_tools.errors import FormatError
from lora_tools.formats.common import A, ALPHA, B, DuplicateRole, KeyGroups, build_layers, scalar_alpha
from lora_tools.formats.source import TensorSource

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")

_KEY = re.compile(r"^(?P<m>lora_[A-Za-z0-9_]+?)\.(?:(?P<role>lora_down|lora_up)\.weight|(?P<alpha>alpha))$")
_ROLE = {"lora_down": A, "lora_up": B}


def looks_like_kohya(keys: list[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) and (".lora_down." in k or ".lora_up." in k) for k in keys)


def load_kohya(source: TensorSource, *, alpha_override: float | None = None) -> Adapter:
    groups = KeyGroups()
    try:
        for key in source.keys():
            match = _KEY.match(key)
            if match and match.group("m").startswith(KOHYA_PREFIXES):
                groups.add(match.group("m"), ALPHA if match.group("alpha") else _ROLE[match.group("role")], key)
            else:
                groups.unclaimed.append(key)
    except DuplicateRole as exc:
        raise FormatError(source.path, str(exc)) from None
    for module, roles in list(groups.modules.items()):
        if set(roles) == {ALPHA}:  # an alpha without factors: nothing to apply
            groups.unclaimed.append(roles[ALPHA])
            del groups.modules[module]

    def alpha_for(module: str, rank: int, roles: dict[str, str]) -> float:
        if alpha_override is not None:
            return alpha_override
        if ALPHA not in roles:
            return float(rank)
        alpha = scalar_alpha(source, roles[ALPHA])
        return alpha if alpha != 0 else float(rank)

    layers = build_layers(source, groups, alpha_for)
    if not layers:
        raise FormatError(source.path, "no kohya LoRA pairs (.lora_down/.lora_up) found")
    adapter = Adapter(
        path=str(source.path),
        format="kohya",
        layers=layers,
        metadata=source.metadata,
        unrecognized_keys=groups.unclaimed,
        names_resolved=False,
    )
    return adapter
