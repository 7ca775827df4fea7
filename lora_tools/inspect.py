"""`inspect`: what an adapter learned, layer by layer, from its factors alone.

Every figure comes from the factors through `linalg` (QR of B and Aᵀ, SVD of an r×r
core), so a 4096×14336 layer costs about as much as a 16×16 one. Flags are verdicts
drawn from those figures, and the figures behind them stay in the report.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError, RequestError
from lora_tools.formats import load_adapter
from lora_tools.formats.names import LAYER_NUMBER, module_family
from lora_tools.linalg import factored, hadamard, nf4, spectrum

# A layer whose ‖ΔW‖_F is below this fraction of the adapter's median is "dead".
DEAD_FRACTION = 1e-4
# Modified z-score (Iglewicz & Hoaglin) above which a layer stands out from its family.
OUTLIER_Z = 3.5
MIN_FAMILY_FOR_OUTLIERS = 4
# ...and whose norm is at least this factor away from the family's median. Without it a
# tight family (same init, MAD of a few percent) makes a layer 15 % off an "outlier".
OUTLIER_MIN_RATIO = 2.0



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


def module_type(name: str) -> str:
    """The module's kind without its position: "q_proj", "to_out.0", "attn1_to_q" (kohya)."""
    if "." not in name:  # kohya: what follows the last block number
        return re.split(r"_\d+_", name)[-1]
    parts = name.split(".")
    if parts[-1].isdigit() and len(parts) > 1:
        return ".".join(parts[-2:])
    return parts[-1]


def layer_report(layer: LoraLayer, sv: np.ndarray | None = None) -> LayerReport:
    """The spectral figures of one layer's scaled update s·B·A (DoRA: its low-rank part);
    `sv`: its singular values when the caller has them (`hadamard.hadamard_spectra`)."""
    scale = layer.scale
    if sv is not None:
        pass
    elif layer.kron_sides is not None:  # LoKr: σ(W₁⊗W₂) = σ(W₁)·σ(W₂), no product formed
        side1, side2 = layer.kron_sides
        sv = factored.kron_singular_values(side1, side2, scale)
    elif layer.hadamard_sides is not None:  # LoHa: BᵀB and AAᵀ from r×r pair products, B and A formed only if ill-conditioned
        side1, side2 = layer.hadamard_sides
        sv = hadamard.hadamard_singular_values(side1, side2, layer.b, layer.a, scale)
    else:
        sv = factored.singular_values(np.asarray(layer.b_matrix), np.asarray(layer.a_matrix), scale)
    name = layer.name
    depth_match = LAYER_NUMBER.search(name) or re.search(r"\d+", name)
    return LayerReport(
        name=name,
        shape=[int(layer.b.shape[0]), int(layer.a.shape[1]), *layer.kernel_size],
        weight_shape=list(layer.weight_shape),
        kind=layer.kind,
        rank=layer.rank,
        alpha=layer.alpha,
        scale=scale,
        fro_norm=float(math.sqrt(float(np.sum(sv**2)))),
        spectral_norm=float(sv[0]) if sv.size else 0.0,
        singular_values=[float(s) for s in sv],
        energy_rank_90=spectrum.energy_rank(sv, 0.90),
        energy_rank_99=spectrum.energy_rank(sv, 0.99),
        effective_rank=spectrum.effective_rank(sv),
        stable_rank=spectrum.stable_rank(sv),
        dora=layer.magnitude is not None,
        algo=layer.algo,
        dtype=layer.dtype,
        family=module_family(name),
        module_type=module_type(name),
        depth=int(depth_match.group()) if depth_match else None,
    )


def _median(values: np.ndarray) -> float:
    """np.median of a non-empty 1-D array (NaN if it holds one), without the import of
    numpy.ma that np.median makes on first use (10–16 ms of a one-second inspect)."""
    ordered = np.sort(values)
    middle = ordered.size // 2
    if np.isnan(ordered[-1]):
        return math.nan
    return float(ordered[middle]) if ordered.size % 2 else float((ordered[middle - 1] + ordered[middle]) / 2)


def flag_layers(layers: list[LayerReport]) -> None:
    """Mark dead layers and layers whose ‖ΔW‖ stands out from their own family.

    Families are the same module across depth (q_proj of every block): comparing a
    layer with its peers, not with the whole adapter, keeps MLP and attention apart.
    The modified z-score uses median and MAD, so one wild layer cannot hide itself; an
    outlier must also be OUTLIER_MIN_RATIO times larger or smaller than the median.
    """
    norms = np.array([layer.fro_norm for layer in layers], dtype=np.float64)
    median_norm = _median(norms) if norms.size else 0.0
    for layer in layers:
        if layer.fro_norm == 0.0 or layer.fro_norm < DEAD_FRACTION * median_norm:
            layer.flags.append("dead")
    families: dict[str, list[LayerReport]] = {}
    for layer in layers:
        families.setdefault(layer.family, []).append(layer)
    for members in families.values():
        alive = [m for m in members if m.fro_norm > 0]
        if len(alive) < MIN_FAMILY_FOR_OUTLIERS:
            continue
        logs = np.log([m.fro_norm for m in alive])
        center = _median(logs)
        mad = _median(np.abs(logs - center))
        if mad == 0.0:
            continue
        for member, value in zip(alive, logs):
            member.norm_z_score = 0.6745 * (float(value) - center) / mad
            if abs(member.norm_z_score) > OUTLIER_Z and abs(float(value) - center) >= math.log(OUTLIER_MIN_RATIO):
                member.flags.append("outlier")


def summarize(adapter: Adapter, base: str | None) -> AdapterSummary:
    config = adapter.config
    n_tensors = sum(len(layer.source_keys) for layer in adapter.layers)
    n_tensors += len(adapter.full_tensors) + len(adapter.unrecognized_keys)
    dtypes = adapter.dtypes
    target_modules = config.get("target_modules") or sorted({module_type(layer.name) for layer in adapter.layers})
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    return AdapterSummary(
        path=adapter.path,
        format=adapter.format,
        n_layers=len(adapter.layers),
        n_params=adapter.n_params,
        dtype=dtypes[0] if len(dtypes) == 1 else ("mixed" if dtypes else "none"),
        ranks=adapter.ranks,
        alphas=adapter.alphas,
        use_rslora=any(layer.use_rslora for layer in adapter.layers),
        use_dora=any(layer.magnitude is not None for layer in adapter.layers),
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in adapter.layers),
        target_modules=list(target_modules),
        base_model=config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str) else None,
        base=base,
        coverage=Coverage(
            n_tensors=n_tensors,
            lora_pairs=len(adapter.layers),
            dora_magnitudes=sum(layer.magnitude is not None for layer in adapter.layers),
            lora_biases=sum(layer.bias is not None for layer in adapter.layers),
            full_tensors=sorted(adapter.full_tensors),
            unrecognized=list(adapter.unrecognized_keys),
        ),
        training_metadata={
            k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "sshs_", "modelspec.")) and len(v) < 2000
        },
    )


def _quiet_report(layer: LoraLayer, sv: np.ndarray | None = None) -> LayerReport:
    with np.errstate(all="ignore"):  # overflow shows as inf and is reported once, by the caller
        return layer_report(layer, sv)


def _quiet_hadamard_spectra(layers: list[LoraLayer]) -> list[np.ndarray]:
    with np.errstate(all="ignore"):
        return hadamard.hadamard_spectra([(*layer.hadamard_sides, layer.b, layer.a, layer.scale) for layer in layers])


def _layer_reports(layers: list[LoraLayer]) -> list[LayerReport]:
    """Every layer's figures, in order. Many small QRs and SVDs (LoHa's r² columns make them
    less small): one BLAS thread each, the layers spread over the cores (numpy releases the
    GIL inside BLAS/LAPACK), as resize does. LoHa layers' σ come first, all of one shape
    at once (`hadamard_spectra`), each core taking a share of the layers."""
    from concurrent.futures import ThreadPoolExecutor

    from lora_tools.linalg.blas import single_threaded_blas

    workers = max(1, min(8, os.cpu_count() or 1, len(layers)))
    loha = [i for i, layer in enumerate(layers) if layer.hadamard_sides is not None and layer.kron_sides is None]
    shares = [[layers[i] for i in loha[k::workers]] for k in range(workers)]
    known: dict[int, np.ndarray] = {}
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
        for k, spectra in enumerate(pool.map(_quiet_hadamard_spectra, shares)):
            known.update(zip(loha[k::workers], spectra))
        rest = [i for i in range(len(layers)) if i not in known]
        computed = dict(zip(rest, pool.map(_quiet_report, [layers[i] for i in rest]))) if workers > 1 else {}
    # a layer whose σ are known is a few small passes: in this thread, 2.4× faster than
    # through the pool (700 LoHa layers: 0.06 s against 0.14 s of hand-offs and GIL waits)
    return [computed[i] if i in computed else _quiet_report(layer, known.get(i)) for i, layer in enumerate(layers)]


def inspect_adapter(
    adapter_path: str | os.PathLike[str],
    *,
    base_path: str | os.PathLike[str] | None = None,
    alpha: float | None = None,
    base_quant: str | None = None,
) -> InspectReport:
    """Read an adapter (and optionally its base) and compute every per-layer figure.

    `base_quant` ("nf4", "nf4,dq", see `linalg.nf4.parse_base_quant`): the adapter was
    trained on the base quantized so (QLoRA); each quantized layer gets NF4's rounding
    error of W0 against its update, and the report a summary of what that means for a merge.
    """
    spec = None if base_quant is None else nf4.parse_base_quant(base_quant)
    if spec is not None and base_path is None:
        raise RequestError(None, "--base-quant needs --base BASE: the rounding error is measured on the base's weights")
    adapter = load_adapter(adapter_path, alpha=alpha)
    base_norms: dict[str, float] = {}
    quant_errors: dict[str, float] = {}
    if base_path is not None:
        adapter, base_norms, quant_errors = _against_base(adapter, base_path, spec)
    layers = _layer_reports(adapter.layers)
    for report in layers:
        figures = [report.scale, report.fro_norm, report.effective_rank, *report.singular_values]
        if not all(math.isfinite(x) for x in figures):  # finite factors, but 1e200·1e200 is not
            raise FormatError(
                adapter.path, f"layer {report.name!r}: s·B·A overflows float64 (scale {report.scale:g}), no figures"
            )
        if report.name in base_norms:
            report.base_fro_norm = base_norms[report.name]
            report.relative_norm = report.fro_norm / report.base_fro_norm if report.base_fro_norm > 0 else None
    flag_layers(layers)
    summary = summarize(adapter, None if base_path is None else os.fspath(base_path))
    if spec is None:
        return InspectReport(summary, layers)
    return InspectReport(summary, layers, base_quant_summary(spec, layers, quant_errors))


def base_quant_summary(spec: nf4.BaseQuant, layers: list[LayerReport], errors: dict[str, float]) -> BaseQuantSummary:
    """Fill each quantized layer's base_quant_error and base_quant_mismatch (flagging
    "quant_mismatch" above 1) and sum them up in one sentence.

    The ratio compares two ways to merge: onto W0 (what a 16-bit serve loads) the result
    differs from what training saw, W_q + ΔW with W_q = deq(NF4(W0)), by W0 − W_q. Above 1,
    that difference is larger in norm than the layer's whole update. A zero update
    gets no ratio (it would be infinite; the layer is flagged dead already).
    """
    rated = []
    for layer in layers:
        if layer.name not in errors:
            continue
        layer.base_quant_error = errors[layer.name]
        if layer.fro_norm > 0:
            layer.base_quant_mismatch = layer.base_quant_error / layer.fro_norm
            rated.append(layer)
            if layer.base_quant_mismatch > 1:
                layer.flags.append("quant_mismatch")
    worst = max(rated, key=lambda m: m.base_quant_mismatch or 0.0, default=None)
    over = sum(1 for m in rated if (m.base_quant_mismatch or 0.0) > 1)
    if worst is None or worst.base_quant_mismatch is None:
        text = (f"no adapted layer has a base weight bitsandbytes holds in NF4 (Linear weights other than lm_head) and a"
                f" non-zero update: --base-quant {spec} changes nothing here")
    else:
        ratio = worst.base_quant_mismatch
        text = (f"merging onto the 16-bit base adds NF4's rounding error, {ratio:.3g}× the update on the worst layer"
                f" ({worst.name}){f', above 1× on {over} of {len(rated)} layers' if over else ''}; merge with"
                f" --base-quant {spec} to merge onto what the adapter was trained against")
    return BaseQuantSummary(
        spec=str(spec), double_quant=spec.double_quant, blocksize=spec.blocksize, quantized_layers=len(errors),
        layers_over_1=over, max_mismatch=None if worst is None else worst.base_quant_mismatch,
        worst_layer=None if worst is None else worst.name, summary=text,
    )


def _against_base(
    adapter: Adapter, base_path: str | os.PathLike[str], spec: nf4.BaseQuant | None = None
) -> tuple[Adapter, dict[str, float], dict[str, float]]:
    """Resolve names against the base, check every layer fits, and measure ‖W0‖_F; with
    `spec`, also ‖W0 − deq(NF4(W0))‖_F of each weight bitsandbytes would quantize."""
    from lora_tools.engine.binding import fit_to_base
    from lora_tools.formats.names import resolve_names
    from lora_tools.io.checkpoint import BaseCheckpoint

    with BaseCheckpoint.open(base_path) as base:
        adapter = resolve_names(adapter, base.module_paths(), os.fspath(base_path))
        targets = fit_to_base(
            adapter, lambda k: base.info(k).shape if base.has(k) else None, os.fspath(base_path), base.value_dtype
        )
        norms = {
            t.layer.name: float(np.linalg.norm(base.numpy(t.weight_key).astype(np.float64).ravel()))
            for t in targets
        }
        for target in targets:
            if not math.isfinite(norms[target.layer.name]):  # a NaN in W0 would poison ‖ΔW‖/‖W0‖
                raise FormatError(base.shard_of(target.weight_key).path, f"tensor {target.weight_key!r} contains NaN or Inf")
        quant_errors = {} if spec is None else {
            t.layer.name: _quant_error(base, t.weight_key, t.transposed, spec)
            for t in targets if nf4.quantized_by_bitsandbytes(t.layer, t.weight_shape)
        }
    return adapter, norms, quant_errors


def _quant_error(base: Any, key: str, transposed: bool, spec: nf4.BaseQuant) -> float:
    """‖W0 − deq(NF4(W0))‖_F of one base weight, read in its stored dtype (bitsandbytes
    quantizes the weight as loaded) and quantized as (out, in), as transformers hands a
    Conv1D weight to it."""
    weight = base.torch(key)
    try:
        return nf4.round_trip_error(weight.T if transposed else weight, spec)
    except RequestError as error:
        raise RequestError(base.shard_of(key).path, f"tensor {key!r}: {error.problem}") from None
