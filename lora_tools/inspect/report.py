"""What `inspect` reports: per layer, per adapter, and for `--base-quant`; dataclasses
whose field names are the JSON keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LayerReport:
    """Figures for one adapted module; field names are the JSON keys of the contract."""

    name: str
    shape: list[int]  # (out, in) of the update as PEFT names them, kernel dims appended for conv
    weight_shape: list[int]  # the base weight as stored: (in, out) for Conv1D, (vocab, dim) for embeddings
    kind: str
    rank: int
    alpha: float
    scale: float
    fro_norm: float
    spectral_norm: float
    singular_values: list[float]
    energy_rank_90: int
    energy_rank_99: int
    effective_rank: float
    stable_rank: float
    dora: bool
    dtype: str
    family: str  # the name with layer numbers replaced by "*"
    module_type: str  # the last component of the name, e.g. "q_proj"
    depth: int | None  # the first layer number in the name
    base_fro_norm: float | None = None
    relative_norm: float | None = None  # ‖s·BA‖_F / ‖W0‖_F, with --base
    norm_z_score: float | None = None  # robust z of log ‖ΔW‖_F within the family
    flags: list[str] = field(default_factory=list)
    algo: str = "lora"  # what the file stored: lora, locon (Tucker), loha, lokr, full; rank is that of the exact LoRA form
    # With --base-quant (JSON keys only then), for a weight bitsandbytes holds in NF4:
    base_quant_error: float | None = None  # ‖W0 − deq(NF4(W0))‖_F
    base_quant_mismatch: float | None = None  # that / ‖s·BA‖_F; > 1 flags "quant_mismatch"


_BASE_QUANT_FIELDS = ("base_quant_error", "base_quant_mismatch")


@dataclass
class BaseQuantSummary:
    """What `--base-quant` found: how far the 16-bit base is from what a QLoRA adapter
    was trained against (deq(NF4(W0))), measured in units of each layer's update."""

    spec: str  # the --base-quant text, normalised: "nf4", "nf4,dq", "nf4,blocksize=128"
    double_quant: bool
    blocksize: int
    quantized_layers: int  # layers whose base weight bitsandbytes would hold in NF4
    layers_over_1: int  # base_quant_mismatch > 1: NF4's rounding moves W0 more than ΔW does
    max_mismatch: float | None
    worst_layer: str | None
    summary: str


@dataclass
class Coverage:
    """Every tensor in the adapter accounted for, and what nothing understood."""

    n_tensors: int
    lora_pairs: int
    dora_magnitudes: int
    lora_biases: int
    full_tensors: list[str]
    unrecognized: list[str]


@dataclass
class AdapterSummary:
    path: str
    format: str
    n_layers: int
    n_params: int
    dtype: str
    ranks: list[int]
    alphas: list[float]
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    target_modules: list[str]
    base_model: str | None
    base: str | None
    coverage: Coverage
    training_metadata: dict[str, str]


@dataclass
class InspectReport:
    adapter: AdapterSummary
    layers: list[LayerReport]
    base_quant: BaseQuantSummary | None = None

    def to_json(self) -> dict[str, Any]:
        # layers by their fields, not asdict: its deep copy of every singular value took
        # longer than computing them for a 700-module LoKr file (~180 K values)
        names = [f.name for f in fields(LayerReport) if self.base_quant is not None or f.name not in _BASE_QUANT_FIELDS]
        document = {"adapter": asdict(self.adapter), "layers": [{name: getattr(layer, name) for name in names}
                                                                for layer in self.layers]}
        if self.base_quant is not None:
            document["base_quant"] = asdict(self.base_quant)
        return document
