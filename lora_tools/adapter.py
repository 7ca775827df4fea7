"""The canonical in-memory adapter that every format is read into and written from.

Nothing downstream of `lora_tools.formats` knows which file format an adapter came
from: it sees `LoraLayer`s keyed by the module path they adapt in the base model, and
`Adapter.full_tensors` for whole tensors that replace the base's (modules_to_save).
Factors are numpy arrays in a float dtype that holds the stored values exactly
(bf16 and fp16 are widened to float32), and `dtype` remembers what was stored. merge
and verify load them as torch tensors in the stored dtype instead, on the compute device
(`formats.source.Place`), so the code on their path (`engine.binding`, `linalg.dense`,
the checks) only uses what both kinds have: shape, ndim, reshape, and
`linalg.dense.factor_tensor` to widen. `Factor` names that contract.

Update kinds: a layer here is a LoRA update, ΔW = s·B·A. LyCORIS' algorithms (LoHa, LoKr,
LoCon with Tucker cores, full differences) all have an exact factorisation of that form
(LoHa as row-wise Khatri–Rao products, LoKr as Kronecker products of each side's factors,
a full diff against an identity), which `formats.lycoris` builds when it reads them;
`algo` says what the file held, so factored math and the merge recipe take every kind
without knowing the file format (docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

    from lora_tools.io.encode import Deferred, Encoded

LayerKind = Literal["linear", "embedding", "conv"]
# A factor as a reader placed it: numpy (inspect, blend) or a torch tensor on the compute
# device in its stored dtype (merge, verify); see the module docstring. A layer made to be
# written may hold its factors already encoded (resize's bf16 output, `io.encode.Encoded`),
# or still being formed on another thread (`io.encode.Deferred`).
Factor: TypeAlias = "np.ndarray | torch.Tensor | Encoded | Deferred"


@dataclass
class LoraLayer:
    """One adapted module: ΔW = scale · B · A, reshaped and oriented like the base weight.

    Factor shapes as stored:
      linear     a (r, in)                b (out, r)
      embedding  a (r, num_embeddings)    b (embedding_dim, r)   ΔW = scale·(B·A)ᵀ
      conv       a (r, in, *kernel)       b (out, r, 1, ...)     ΔW = (B₂·A₂).reshape
    fan_in_fan_out marks a GPT-2 Conv1D base whose weight is stored (in, out), so the
    update is stored transposed too.
    """

    name: str
    a: Factor
    b: Factor
    alpha: float
    kind: LayerKind = "linear"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    magnitude: Factor | None = None  # DoRA: PEFT's lora_magnitude_vector, LyCORIS' dora_scale
    bias: Factor | None = None  # lora_bias: added to the base bias times scale
    dtype: str = "F32"  # stored dtype code of the factors, e.g. "BF16" (built factors: one that holds them exactly)
    source_keys: tuple[str, ...] = ()  # the file's keys this layer was read from
    algo: str = "lora"  # what the file stored: "lora", "locon" (Tucker), "loha", "lokr", "full"
    magnitude_axis: Literal["out", "in"] = "out"  # DoRA norm per output feature (PEFT) or per input column (LyCORIS)
    magnitude_eps: float = 0.0  # added to DoRA's norm: LyCORIS adds float32's eps, PEFT nothing
    stored_params: int | None = None  # the file's own count when a and b are built from other tensors (LoHa, LoKr)
    kron_sides: Any = None  # LoKr: ((U₁, V₁), (U₂, V₂)) with B·A = kron(U₁V₁, U₂V₂), for σ without forming B·A
    hadamard_sides: Any = None  # LoHa: ((U₁, V₁), (U₂, V₂)) with B·A = (U₁V₁)∘(U₂V₂), for σ without forming B·A

    @property
    def rank(self) -> int:
        """r, from the factor's shape (the file's truth, whatever the config says)."""
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / √r under rsLoRA."""
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.a.shape[2:]) if self.kind == "conv" else ()

    @property
    def b_matrix(self) -> Factor:
        """B as a 2-D (out, r) matrix (conv's trailing 1×1 dropped)."""
        return self.b.reshape(self.b.shape[0], self.b.shape[1])

    @property
    def a_matrix(self) -> Factor:
        """A as a 2-D (r, in·k) matrix (conv kernels flattened as PEFT does)."""
        return self.a.reshape(self.a.shape[0], -1)

    @property
    def update_matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of B·A, the matrix whose spectrum we report."""
        return (int(self.b.shape[0]), math.prod(self.a.shape[1:]))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this layer updates, as the checkpoint stores it."""
        out_dim, in_dim = int(self.b.shape[0]), int(self.a.shape[1])
        if self.kind == "embedding":
            return (in_dim, out_dim)
        if self.kind == "conv":
            return (out_dim, in_dim, *self.kernel_size)
        return (in_dim, out_dim) if self.fan_in_fan_out else (out_dim, in_dim)

    @property
    def n_params(self) -> int:
        if self.stored_params is not None:
            return self.stored_params
        return sum(math.prod(x.shape) for x in (self.a, self.b, self.magnitude, self.bias) if x is not None)

    def dense_update(self) -> np.ndarray:
        """ΔW in float64, shaped like the base weight. For tests and small layers only."""
        b = np.asarray(self.b_matrix, dtype=np.float64)  # (out, r)
        a = np.asarray(self.a_matrix, dtype=np.float64)  # (r, in·k)
        delta = self.scale * (b @ a)
        if self.kind == "embedding" or self.fan_in_fan_out:
            return delta.T
        return delta.reshape(self.weight_shape)


@dataclass
class Adapter:
    """An adapter file or folder, read into format-free form."""

    path: str
    format: str  # "peft", "kohya", "diffusers", ...
    layers: list[LoraLayer]
    full_tensors: dict[str, Factor] = field(default_factory=dict)  # base key -> tensor
    full_tensor_dtypes: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # PEFT-style config (r, lora_alpha, ...)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    unrecognized_keys: list[str] = field(default_factory=list)
    names_resolved: bool = True  # False for kohya names not yet mapped to module paths

    def layer(self, name: str) -> LoraLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers) + sum(math.prod(t.shape) for t in self.full_tensors.values())

    @property
    def dtypes(self) -> list[str]:
        seen = {layer.dtype for layer in self.layers} | set(self.full_tensor_dtypes.values())
        return sorted(seen)

    @property
    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers})

    @property
    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.layers})
