"""Which base tensor each adapter layer updates, and in which orientation.

PEFT decides fan_in_fan_out by layer type (GPT-2 `Conv1D` stores W as (in, out)); a
checkpoint reader only has shapes, so the shape decides, and the adapter's own flag
breaks the tie for square weights. kohya writes 4-D factors for 1×1 convs that may
sit on Linear bases (and the reverse), so equal element counts with a 1×1 kernel fit;
LyCORIS stores some conv factors flattened, (r, in·kh·kw), which fit the conv weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import MismatchError
from lora_tools.formats.names import tied_hint
from lora_tools.io.dtypes import FLOAT_DTYPES


@dataclass(frozen=True)
class LayerTarget:
    """An adapter layer bound to the base tensor it updates."""

    layer: LoraLayer
    weight_key: str
    weight_shape: tuple[int, ...]
    transposed: bool  # ΔW = (s·B·A)ᵀ: embeddings and fan_in_fan_out weights

    @property
    def bias_key(self) -> str:
        return self.layer.name + ".bias"


def orientation(layer: LoraLayer, base_shape: Sequence[int]) -> bool | None:
    """True if the update must be transposed to fit `base_shape`, False if it fits as
    is, None if it does not fit at all."""
    base_shape = tuple(base_shape)
    out_dim, in_dim = layer.update_matrix_shape
    if layer.kind == "embedding":
        return True if base_shape == (in_dim, out_dim) else None
    if layer.kind == "conv" and base_shape == (out_dim, layer.a.shape[1], *layer.kernel_size):
        return False
    if len(base_shape) == 2:
        straight, flipped = base_shape == (out_dim, in_dim), base_shape == (in_dim, out_dim)
        if straight and flipped:
            return layer.fan_in_fan_out
        if straight or flipped:
            return flipped
    pointwise = all(d == 1 for d in base_shape[2:]) and all(d == 1 for d in layer.kernel_size)
    if pointwise and len(base_shape) >= 2 and base_shape[:2] == (out_dim, in_dim):
        return False
    if layer.kind == "linear" and len(base_shape) > 2 and base_shape[0] == out_dim and math.prod(base_shape[1:]) == in_dim:
        return False  # a conv update stored flattened (LyCORIS' LoHa/LoKr: (r, in·kh·kw))
    return None


def fit_to_base(
    adapter: Adapter,
    weight_shape: Callable[[str], tuple[int, ...] | None],
    base_path: str,
    weight_dtype: Callable[[str], str] | None = None,
) -> list[LayerTarget]:
    """Bind every layer to its base weight; the first layer that does not fit is an error.

    `weight_shape(key)` gives a base tensor's shape, or None when the base lacks it;
    `weight_dtype(key)` its safetensors dtype code: a LoRA update needs a float weight.
    """
    targets = []
    for layer in adapter.layers:
        key = layer.name + ".weight"
        shape = weight_shape(key)
        if shape is None:
            hint = tied_hint(base_path, layer.name)
            raise MismatchError(adapter.path, f"layer {layer.name!r} has no weight {key!r} in base {base_path}{hint}")
        dtype = weight_dtype(key) if weight_dtype is not None else "F32"
        if dtype not in FLOAT_DTYPES:  # the update would be truncated to integers
            raise MismatchError(
                adapter.path, f"layer {layer.name!r}: base weight {key!r} in {base_path} is {dtype}, not a float tensor"
            )
        transposed = orientation(layer, shape)
        if transposed is None:
            out_dim, in_dim = layer.update_matrix_shape
            raise MismatchError(
                adapter.path,
                f"layer {layer.name!r}: update of shape ({out_dim}, {in_dim}) does not fit base weight {key!r} of shape {tuple(shape)} in {base_path}",
            )
        targets.append(LayerTarget(layer, key, tuple(shape), transposed))
    for key, tensor in adapter.full_tensors.items():
        shape = weight_shape(key)
        if shape is None:
            hint = tied_hint(base_path, key.rpartition(".")[0])
            raise MismatchError(
                adapter.path, f"tensor {key!r} (modules_to_save) has no counterpart in base {base_path}{hint}"
            )
        if tuple(shape) != tuple(tensor.shape):
            raise MismatchError(
                adapter.path, f"tensor {key!r} has shape {tuple(tensor.shape)} but base {base_path} has {tuple(shape)}"
            )
    return targets
