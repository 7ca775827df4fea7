"""`inspect` figures (issue #3) against dense float64 numpy on the raw tensors.

For every layer of every fixture adapter: the singular values of s·B·A (conv flattened
to (out, in·k), embeddings transposed), its norms, rank usage, and with a base the
relative norm ‖ΔW‖_F / ‖W0‖_F. Plus the verdicts: dead layers, outliers, and adapters
that do not fit their base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import DIFFUSERS_CASE_KINDS, PEFT_CASE_KINDS, PeftCase
from lora_tools.errors import MismatchError
from lora_tools.inspect import inspect_adapter
from test_formats import RefLayer, raw_tensors, reference_layers, resolved_name

ALL_CASES = (*PEFT_CASE_KINDS, "kohya", *DIFFUSERS_CASE_KINDS)


@pytest.fixture(scope="session", params=ALL_CASES, ids=ALL_CASES)
def any_case(request, peft_case_factory, kohya_case, diffusers_case_factory):
    if request.param == "kohya":
        return kohya_case
    if request.param in DIFFUSERS_CASE_KINDS:
        return diffusers_case_factory(request.param)
    return peft_case_factory(request.param)


def adapter_path(case) -> Path:
    return case.adapter_dir if isinstance(case, PeftCase) else case.lora_file


def base_path(case) -> Path:
    return case.base_dir if isinstance(case, PeftCase) else case.base_file


def base_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a base folder or file, float64."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(raw_tensors(f))
    return out


# --------------------------------------------------------------------------- reference figures


def energy_rank(sv: np.ndarray, fraction: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ fraction · Σ σᵢ²; 0 for a zero spectrum."""
    energy = np.asarray(sv, dtype=np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return 0
    cumulative = np.cumsum(energy)
    return int(np.argmax(cumulative >= fraction * total * (1 - 1e-12))) + 1


def entropy_effective_rank(sv: np.ndarray) -> float:
    """exp of the entropy of p = σ / Σσ (Roy & Vetterli)."""
    s = np.asarray(sv, dtype=np.float64)
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def reference_spectrum(ref: RefLayer) -> np.ndarray:
    """The r singular values of the dense s·B·A, zero-padded if r > min(out, in)."""
    sv = np.linalg.svd(ref.product(), compute_uv=False)
    out = np.zeros(ref.rank)
    out[: min(ref.rank, sv.size)] = sv[: ref.rank]
    return out


def assert_figures(layer, ref: RefLayer) -> None:
    """Every per-layer number of a LayerReport against the dense float64 reference."""
    dense = ref.dense()
    sv = reference_spectrum(ref)
    # ΔW as stored (embeddings transposed, conv 4-D) has the same spectrum as s·B·A.
    stored_sv = np.linalg.svd(dense.reshape(dense.shape[0], -1), compute_uv=False)
    np.testing.assert_allclose(stored_sv[: ref.rank], sv[: stored_sv.size], atol=1e-12 * sv[0])
    tol = 1e-9 * max(sv[0], 1e-300)
    assert layer.rank == ref.rank
    assert layer.alpha == pytest.approx(ref.alpha, rel=1e-12)
    assert layer.scale == pytest.approx(ref.scale, rel=1e-12)
    assert layer.kind == ref.kind
    assert list(layer.shape) == [ref.b.shape[0], *ref.a.shape[1:]]  # CONTRACT: (out, in)
    assert list(layer.weight_shape) == list(dense.shape)
    assert len(layer.singular_values) == ref.rank
    got = np.array(layer.singular_values)
    assert np.all(np.diff(got) <= 0), "singular values must be descending"
    np.testing.assert_allclose(got, sv, rtol=0, atol=tol)
    assert layer.fro_norm == pytest.approx(np.linalg.norm(dense), rel=1e-10)
    assert layer.spectral_norm == pytest.approx(sv[0], rel=1e-10)
    assert layer.energy_rank_90 == energy_rank(sv, 0.90)
    assert layer.energy_rank_99 == energy_rank(sv, 0.99)
    assert layer.effective_rank == pytest.approx(entropy_effective_rank(sv), rel=1e-9)
    assert 1.0 <= layer.effective_rank <= ref.rank + 1e-9
    assert 1 <= layer.energy_rank_90 <= layer.energy_rank_99 <= ref.rank
    assert layer.dora == (ref.magnitude is not None)


# --------------------------------------------------------------------------- figures


def test_inspect_figures_match_dense_svd(any_case) -> None:
    refs = reference_layers(any_case)
    report = inspect_adapter(adapter_path(any_case))
    assert [layer.name for layer in report.layers] and {layer.name for layer in report.layers} == set(refs)
    for layer in report.layers:
        assert_figures(layer, refs[layer.name])
        assert layer.base_fro_norm is None and layer.relative_norm is None
    summary = report.adapter
    assert summary.n_layers == len(refs)
    assert summary.ranks == sorted({ref.rank for ref in refs.values()})
    assert summary.alphas == pytest.approx(sorted({ref.alpha for ref in refs.values()}))
    json.dumps(report.to_json(), allow_nan=False)


def test_inspect_with_base_adds_relative_norm(any_case) -> None:
    refs = {resolved_name(any_case, name): ref for name, ref in reference_layers(any_case).items()}
    weights = base_weights(base_path(any_case))
    report = inspect_adapter(adapter_path(any_case), base_path=base_path(any_case))
    assert report.adapter.base == str(base_path(any_case))
    assert {layer.name for layer in report.layers} == set(refs)
    for layer in report.layers:
        ref = refs[layer.name]
        assert_figures(layer, ref)
        w0 = weights[f"{layer.name}.weight"]
        assert list(layer.weight_shape) == list(w0.shape)  # the base weight's shape, as stored
        assert layer.base_fro_norm == pytest.approx(np.linalg.norm(w0), rel=1e-10)
        assert layer.relative_norm == pytest.approx(np.linalg.norm(ref.dense()) / np.linalg.norm(w0), rel=1e-9)


def test_n_params_counts_every_stored_number(any_case) -> None:
    path = adapter_path(any_case)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    tensors = raw_tensors(file)
    counted = sum(t.size for k, t in tensors.items() if not k.endswith(".alpha"))
    assert inspect_adapter(path).adapter.n_params == counted


# --------------------------------------------------------------------------- verdicts


def _copy_with(case: PeftCase, dst: Path, edit) -> Path:
    """A copy of the adapter folder whose tensors went through `edit(key, tensor)`."""
    dst.mkdir()
    shutil.copy(case.adapter_dir / "adapter_config.json", dst)
    tensors = load_file(case.adapter_file)
    save_file({k: edit(k, v) for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst


def test_all_zero_update_is_dead_not_an_error(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """PEFT's default init (B = 0): every figure is 0, every layer is flagged dead."""
    path = _copy_with(llama_plain_case, tmp_path / "zero", lambda k, v: torch.zeros_like(v) if ".lora_B." in k else v)
    report = inspect_adapter(path)
    assert len(report.layers) == 14
    for layer in report.layers:
        assert layer.fro_norm == 0.0 and layer.spectral_norm == 0.0
        assert layer.singular_values == [0.0] * layer.rank
        assert layer.energy_rank_90 == layer.energy_rank_99 == 0 and layer.effective_rank == 0.0
        assert "dead" in layer.flags and "outlier" not in layer.flags
    json.dumps(report.to_json(), allow_nan=False)  # no NaN from 0/0


def test_one_dead_layer_among_live_ones(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    target = "model.layers.1.self_attn.o_proj"
    path = _copy_with(
        llama_plain_case, tmp_path / "one_dead",
        lambda k, v: torch.zeros_like(v) if k == f"base_model.model.{target}.lora_B.weight" else v,
    )
    flagged = {layer.name for layer in inspect_adapter(path).layers if "dead" in layer.flags}
    assert flagged == {target}


# A Llama with 8 blocks and LoRA on all 7 projections: 56 layers, families of 8.
LONG_LAYERS, LONG_MODULES = 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_long_adapter(root: Path) -> Path:
    """Build (once) `root/peft-llama-long`: a PEFT adapter with > 40 layers, made by peft."""
    out = Path(root) / "peft-llama-long"
    if (out / "adapter_model.safetensors").exists():
        return out
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LONG_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2468)
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
            r=4, lora_alpha=8, target_modules=LONG_MODULES, init_lora_weights=False, lora_dropout=0.0))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def long_adapter(fixture_root: Path) -> Path:
    return build_long_adapter(fixture_root)


def test_long_adapter_has_no_outlier(long_adapter: Path) -> None:
    report = inspect_adapter(long_adapter)
    assert len(report.layers) == LONG_LAYERS * len(LONG_MODULES)
    assert not any(layer.flags for layer in report.layers)


def test_outlier_layer_is_flagged(long_adapter: Path, tmp_path: Path) -> None:
    target = "model.layers.5.self_attn.v_proj"
    dst = tmp_path / "outlier"
    shutil.copytree(long_adapter, dst)
    tensors = load_file(long_adapter / "adapter_model.safetensors")
    tensors[f"base_model.model.{target}.lora_B.weight"] *= 100
    save_file(tensors, dst / "adapter_model.safetensors")
    report = inspect_adapter(dst)
    flagged = {layer.name: layer.flags for layer in report.layers if layer.flags}
    assert flagged == {target: ["outlier"]}
    layer = next(layer for layer in report.layers if layer.name == target)
    assert layer.norm_z_score is not None and layer.norm_z_score > 3.5


# --------------------------------------------------------------------------- base that does not fit


def test_adapter_for_another_model_names_the_first_missing_layer(llama_plain_case: PeftCase, gpt2_base_dir: Path) -> None:
    with pytest.raises(MismatchError) as info:
        inspect_adapter(llama_plain_case.adapter_dir, base_path=gpt2_base_dir)
    message = str(info.value)
    assert message.startswith(f"{llama_plain_case.adapter_dir}: ")
    assert "'model.layers.0.mlp.down_proj'" in message and str(gpt2_base_dir) in message


def reshaped_base(src: Path, dst: Path, new_shapes: dict[str, tuple[int, ...]]) -> Path:
    """A copy of a base folder in which some weights have another shape."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    for key, shape in new_shapes.items():
        tensors[key] = torch.zeros(shape)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_shape_mismatch_names_the_first_layer(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base = reshaped_base(llama_plain_case.base_dir, tmp_path / "base", {
        "model.layers.0.self_attn.v_proj.weight": (48, 64),
        "model.layers.1.mlp.up_proj.weight": (128, 32),
    })
    with pytest.raises(MismatchError) as info:
        inspect_adapter(llama_plain_case.adapter_dir, base_path=base)
    message = str(info.value)
    assert message.startswith(f"{llama_plain_case.adapter_dir}: ")
    assert "'model.layers.0.self_attn.v_proj'" in message and "up_proj" not in message
    assert "(48, 64)" in message and "\n" not in message


def test_sharded_base_gives_the_same_norms(llama_plain_case: PeftCase, llama_sharded_base_dir: Path) -> None:
    single = inspect_adapter(llama_plain_case.adapter_dir, base_path=llama_plain_case.base_dir)
    sharded = inspect_adapter(llama_plain_case.adapter_dir, base_path=llama_sharded_base_dir)
    assert [(l.name, l.base_fro_norm, l.relative_norm) for l in single.layers] == [
        (l.name, l.base_fro_norm, l.relative_norm) for l in sharded.layers
    ]


def test_summary_of_a_bare_file(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """No config: target modules and alphas come from the file itself."""
    lone = tmp_path / "lora.safetensors"
    shutil.copy(llama_plain_case.adapter_file, lone)
    summary = inspect_adapter(lone).adapter
    assert summary.path == str(lone) and summary.format == "peft" and summary.base_model is None
    assert summary.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert summary.ranks == [4] and summary.alphas == [4.0] and summary.dtype == "F32"
    assert summary.coverage.n_tensors == 28 and summary.coverage.lora_pairs == 14
    assert summary.coverage.unrecognized == [] and summary.coverage.full_tensors == []


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [5.0, -1.0, 2.5, 2.5, 9.0], [1.0, float("inf"), 0.5, 7.0],
                                    [1.0, float("nan"), 2.0], list(np.random.default_rng(0).standard_normal(101))])
def test_median_is_numpys(values) -> None:
    from lora_tools.inspect.figures import _median

    want = float(np.median(np.array(values)))
    got = _median(np.array(values))
    assert (np.isnan(want) and np.isnan(got)) or got == want
