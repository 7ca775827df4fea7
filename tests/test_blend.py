"""blend (issue #5): every method against dense float64 numpy and against PEFT itself.

Inputs are real PEFT adapters built here by peft on the session's tiny Llama base
(init_lora_weights=False, seeded): A (r 8, α 16, all projections + embed_tokens),
A2 (same config, other seed), B (r 4, α 8, rsLoRA, a subset of A's modules), plus the
conftest cases with rank/alpha patterns, DoRA, lora_bias, Conv1D and kohya files.
Every input's update ΔWᵢ comes from PEFT's own get_delta_weight in float64, so the
references share no code with lora_tools.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file as load_numpy

from builders import PeftCase
from cli_run import run_cli
from lora_tools.blend.dense import keep_mask, refactor
from lora_tools.blend.operation import blend, blend_adapters
from lora_tools.formats import load_adapter
from lora_tools.io.encode import float32_to_bf16_bits
from lora_tools.linalg.factored import factored_svd, truncate
from lora_tools.linalg.qr import orthonormal_factor

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- fixtures ---------------------------------------------------------------------------


def _base_model(base_dir: Path, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def _make_peft(base_dir: Path, out: Path, seed: int, perturb_saved: bool = False, **config: object) -> Path:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(_base_model(base_dir, torch.float32),
                                   LoraConfig(init_lora_weights=False, lora_dropout=0.0, **config))
            if perturb_saved:  # PEFT copies lm_head as is; make the copy differ from the base
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if ".modules_to_save." in name:
                            p.add_(0.05 * torch.randn(p.shape))
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, llama_base_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blend_inputs")
    make = functools.partial(_make_peft, llama_base_dir)
    return {
        "A": make(root / "A", 101, r=8, lora_alpha=16, target_modules=LLAMA_ALL + ["embed_tokens"]),
        "A2": make(root / "A2", 102, r=8, lora_alpha=16, target_modules=LLAMA_ALL + ["embed_tokens"]),
        "B": make(root / "B", 103, r=4, lora_alpha=8, use_rslora=True,
                  target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        "S1": make(root / "S1", 104, True, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "S2": make(root / "S2", 105, True, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    }


@functools.lru_cache(maxsize=None)
def peft_deltas(base_dir: Path, adapter: Path) -> dict[str, np.ndarray]:
    """module path -> ΔW (float64, shaped like the base weight) by PEFT's get_delta_weight;
    modules_to_save copies as "<module>.weight" -> the full tensor."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base_model(base_dir), adapter).eval()
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {}):
            deltas[name] = module.get_delta_weight("default").detach().double().numpy()
        if hasattr(module, "modules_to_save") and "default" in module.modules_to_save:
            deltas[name + ".weight"] = module.modules_to_save["default"].weight.detach().double().numpy()
    return deltas


def weighted_sum(base_dir: Path, adapters: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ·ΔWᵢ per module, over the inputs that adapt it."""
    total: dict[str, np.ndarray] = {}
    for path, w in zip(adapters, weights):
        for name, delta in peft_deltas(base_dir, path).items():
            if not name.endswith(".weight"):
                total[name] = total.get(name, 0.0) + w * delta
    return total




def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def close(actual: np.ndarray, expected: np.ndarray, rel: float) -> bool:
    return float(np.linalg.norm(actual - expected)) <= rel * max(float(np.linalg.norm(expected)), 1e-30)


# -- the factored methods ---------------------------------------------------------------


def test_cat_is_the_exact_weighted_sum(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """cat: rank Σrᵢ where both adapt a module, A's alone elsewhere; ΔW equal to rounding (F32)."""
    weights = [0.7, -0.4]  # a negative weight is task negation
    out = tmp_path / "cat"
    code, stdout, stderr = run_cli("blend", inputs["A"], inputs["B"], "--weight", 0.7, "--weight", -0.4,
                                   "--method", "cat", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    expected = weighted_sum(llama_base_dir, [inputs["A"], inputs["B"]], weights)
    written = peft_deltas(llama_base_dir, out)
    assert set(written) == set(expected)
    for name, delta in expected.items():
        assert close(written[name], delta, 1e-6), name
    ranks = {layer["name"]: layer["rank_out"] for layer in report["layers"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 12 and ranks["model.layers.0.self_attn.k_proj"] == 8
    assert ranks["model.embed_tokens"] == 12
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == 8 and config["lora_alpha"] == 8
    assert config["rank_pattern"]["model.layers.1.mlp.down_proj"] == 12
    assert config["alpha_pattern"] == config["rank_pattern"]  # alpha = r: scale 1, folded into the factors
    assert all(layer["energy_kept"] == 1.0 and layer["residual_fro"] == 0.0 for layer in report["layers"])


def test_svd_residual_is_the_eckart_young_optimum(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """svd --rank R: ‖ΔW − ΔW_R‖ reported and written equal the optimum √Σ_{i>R}σᵢ² of the dense sum."""
    weights, rank = [0.6, 0.8], 6
    report = blend([inputs["A"], inputs["B"]], tmp_path / "svd", weights, method="svd", rank=rank, dtype="fp64")
    expected = weighted_sum(llama_base_dir, [inputs["A"], inputs["B"]], weights)
    written = peft_deltas(llama_base_dir, tmp_path / "svd")
    by_name = {layer.name: layer for layer in report.layers}
    for name, delta in expected.items():
        sigma = np.linalg.svd(delta, compute_uv=False)
        optimum = math.sqrt(float(np.sum(sigma[rank:] ** 2)))
        assert np.linalg.norm(written[name] - delta) <= optimum * (1 + 1e-6) + 1e-12, name
        assert by_name[name].residual_fro == pytest.approx(optimum, rel=1e-6, abs=1e-12)
        assert by_name[name].energy_kept == pytest.approx(float(np.sum(sigma[:rank] ** 2) / np.sum(sigma**2)), rel=1e-9)
        assert by_name[name].fro_norm_sum == pytest.approx(float(np.linalg.norm(delta)), rel=1e-9)
        assert by_name[name].rank_out == min(rank, by_name[name].ranks_in[0] + (by_name[name].ranks_in[1] or 0))


def test_svd_default_rank_and_energy_target(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """R defaults to the largest input rank; --energy keeps the smallest rank per layer
    holding that share, written with rank_pattern, and PEFT loads each rank right."""
    weights = [0.5, 0.5]
    report = blend([inputs["A"], inputs["B"]], tmp_path / "default", weights)
    assert report.rank == 8 and {layer.rank_out for layer in report.layers} == {8}
    report = blend([inputs["A"], inputs["B"]], tmp_path / "energy", weights, energy=0.9, rank=10)
    expected = weighted_sum(llama_base_dir, [inputs["A"], inputs["B"]], weights)
    config = json.loads((tmp_path / "energy" / "adapter_config.json").read_text())
    for layer in report.layers:
        sigma = np.linalg.svd(expected[layer.name], compute_uv=False)
        share = np.cumsum(sigma**2) / np.sum(sigma**2)
        wanted = min(10, int(np.searchsorted(share, 0.9 * (1 - 1e-12))) + 1)
        assert layer.rank_out == wanted, layer.name
        assert layer.energy_kept >= 0.9
        assert config["rank_pattern"].get(layer.name, config["r"]) == wanted
    written = peft_deltas(llama_base_dir, tmp_path / "energy")
    assert {name: d.shape for name, d in written.items()} == {name: d.shape for name, d in expected.items()}


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_interpolation_endpoints_give_the_inputs(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path, t: float) -> None:
    """--weight 0 gives A, --weight 1 gives B (modules only A adapts are dropped)."""
    out = tmp_path / "lerp"
    code, stdout, stderr = run_cli("blend", inputs["A"], inputs["B"], "--weight", t, "-o", out, "--json")
    assert code == 0, stderr
    source = peft_deltas(llama_base_dir, inputs["B" if t else "A"])
    written = peft_deltas(llama_base_dir, out)
    assert set(written) == set(source)
    for name, delta in source.items():
        assert close(written[name], delta, 1e-6), name
    report = json.loads(stdout)
    assert report["weights"] == [1.0 - t, t]
    assert len(report["dropped_layers"]) == (8 if t else 0)  # A's 15 modules, B's 7 among them


def test_linear_reproduces_peft(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """linear = PEFT's add_weighted_adapter(combination_type="linear") factor for factor,
    and the report's relative error is its true distance from Σ wᵢ·ΔWᵢ."""
    from peft import PeftModel

    weights = [0.6, -0.3]
    report = blend([inputs["A"], inputs["A2"]], tmp_path / "linear", weights, method="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base_model(llama_base_dir, torch.float32), inputs["A"], adapter_name="a")
        model.load_adapter(inputs["A2"], adapter_name="a2")
        model.add_weighted_adapter(["a", "a2"], weights, "mix", combination_type="linear")
    ours = load_numpy(str(tmp_path / "linear" / "adapter_model.safetensors"))
    checked = 0
    for name, module in model.base_model.model.named_modules():
        for part, a_key, b_key in (("lora_A", "lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_A", "lora_embedding_B")):
            if "mix" in getattr(module, part, {}):
                peft_a = getattr(module, part)["mix"]
                peft_b = getattr(module, part.replace("_A", "_B"))["mix"]
                peft_a = peft_a.weight if hasattr(peft_a, "weight") else peft_a
                peft_b = peft_b.weight if hasattr(peft_b, "weight") else peft_b
                np.testing.assert_allclose(ours[f"base_model.model.{name}.{a_key}"], peft_a.detach().numpy(), rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(ours[f"base_model.model.{name}.{b_key}"], peft_b.detach().numpy(), rtol=1e-6, atol=1e-7)
                assert module.scaling["mix"] == 1.0
                checked += 1
    assert checked == 15
    expected = weighted_sum(llama_base_dir, [inputs["A"], inputs["A2"]], weights)
    written = peft_deltas(llama_base_dir, tmp_path / "linear")
    for layer in report.layers:
        true_error = np.linalg.norm(written[layer.name] - expected[layer.name]) / np.linalg.norm(expected[layer.name])
        assert layer.relative_error == pytest.approx(true_error, rel=1e-5)
        assert layer.relative_error > 0.1  # cross terms Bᵢ·Aⱼ: linear is not the weighted sum


def test_linear_needs_equal_ranks(inputs: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = run_cli("blend", inputs["A"], inputs["B"], "--weight", 0.5, "--method", "linear", "-o", tmp_path / "x")
    assert code == 2 and "equal ranks" in one_error_line(stderr) and str(inputs["B"]) in stderr
    assert not (tmp_path / "x").exists()


def test_patterns_and_rslora_inputs(peft_case_factory: Callable[[str], PeftCase], inputs: dict[str, Path], tmp_path: Path) -> None:
    """rank_pattern/alpha_pattern (llama_patterns) with rsLoRA (B): each scale honoured."""
    case = peft_case_factory("llama_patterns")
    paths = [case.adapter_dir, inputs["B"]]
    blend(paths, tmp_path / "mix", [1.5, -0.5], method="cat", dtype="fp64")
    expected = weighted_sum(case.base_dir, paths, [1.5, -0.5])
    written = peft_deltas(case.base_dir, tmp_path / "mix")
    assert set(written) == set(expected)
    for name, delta in expected.items():
        assert close(written[name], delta, 1e-12), name


# -- TIES and DARE against the papers -----------------------------------------------------


def _reference_mix(method: str, deltas: list[np.ndarray], weights: list[float], density: float, normalize: bool,
                   masks: list[np.ndarray] | None) -> np.ndarray:
    """TIES (trim top-k |τ|, elect sign of Σwτ, disjoint mean) and DARE (drop, rescale), as written in the papers
    and mergekit, in float64 numpy."""
    if method == "ties":
        pruned = []
        for d in deltas:
            k = int(density * d.size)
            keep = np.zeros(d.size, dtype=bool)
            keep[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True
            pruned.append(np.where(keep.reshape(d.shape), d, 0.0))
    else:
        pruned = [d * m / density for d, m in zip(deltas, masks or [])]
    weighted = [w * p for w, p in zip(weights, pruned)]
    if method == "dare_linear":
        return sum(weighted)
    elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [np.sign(x) == elected for x in weighted]
    mixed = sum(np.where(g, x, 0.0) for g, x in zip(agree, weighted))
    if normalize:
        divisor = sum(np.where(g, w, 0.0) for g, w in zip(agree, weights))
        mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    return mixed


@pytest.mark.parametrize("method,density,normalize", [("ties", 0.4, True), ("ties", 0.7, False),
                                                      ("dare_linear", 0.5, False), ("dare_ties", 0.3, False)])
def test_ties_and_dare_match_the_papers(inputs: dict[str, Path], llama_base_dir: Path, method: str, density: float,
                                        normalize: bool) -> None:
    """At full rank the written update is exactly the TIES/DARE mix of the dense ΔWᵢ."""
    paths, weights = [inputs["A"], inputs["A2"]], [0.7, 0.5]
    adapters = [load_adapter(p) for p in paths]
    result = blend_adapters(adapters, weights, method=method, rank=64, density=density, seed=7,
                            normalize=normalize, device="cpu", compute_dtype="float64")
    deltas = [peft_deltas(llama_base_dir, p) for p in paths]
    for layer, report in zip(result.layers, result.reports):
        name = layer.name
        # blend works in the factors' orientation (out, in); embeddings' PEFT ΔW is its transpose
        dense = [d[name].T if layer.kind == "embedding" else d[name] for d in deltas]
        masks = [keep_mask(7, name, i, dense[i].shape, density).numpy() for i in range(2)] if method != "ties" else None
        expected = _reference_mix(method, dense, weights, density, normalize, masks)
        got = layer.b @ layer.a
        assert close(got, expected, 1e-9), name
        assert report.energy_kept == pytest.approx(1.0)
        plain = weights[0] * dense[0] + weights[1] * dense[1]
        assert report.relative_error == pytest.approx(np.linalg.norm(got - plain) / np.linalg.norm(plain), rel=1e-6)


def test_ties_truncation_and_cli(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """Below full rank the factors are the dense mix's best rank-R approximation; PEFT loads the file."""
    out = tmp_path / "ties"
    code, stdout, stderr = run_cli("blend", inputs["A"], inputs["A2"], "--weight", 0.5, "--method", "ties",
                                   "--density", 0.5, "--rank", 4, "--device", "cpu", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["normalize"] is True and report["device"] == "cpu"
    deltas = [peft_deltas(llama_base_dir, p) for p in (inputs["A"], inputs["A2"])]
    written = peft_deltas(llama_base_dir, out)
    for layer in report["layers"]:
        name = layer["name"]
        dense = [d[name] for d in deltas]
        mixed = _reference_mix("ties", dense, [0.5, 0.5], 0.5, True, None)
        sigma = np.linalg.svd(mixed, compute_uv=False)
        assert layer["energy_kept"] == pytest.approx(float(np.sum(sigma[:4] ** 2) / np.sum(sigma**2)), rel=1e-4)
        assert np.linalg.norm(written[name] - mixed) <= math.sqrt(float(np.sum(sigma[4:] ** 2))) * (1 + 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_dense_methods_on_cuda_match_cpu(inputs: dict[str, Path], method: str) -> None:
    """Same masks (CPU generator) and the same mix on the GPU: equal to the CPU result."""
    adapters = [load_adapter(inputs["A"]), load_adapter(inputs["A2"])]
    run = functools.partial(blend_adapters, adapters, [0.7, 0.5], method=method, rank=64, density=0.5, seed=5,
                            compute_dtype="float64")
    cpu, gpu = run(device="cpu"), run(device="cuda")
    assert gpu.device.startswith("cuda")
    for x, y in zip(cpu.layers, gpu.layers):
        assert close(y.b @ y.a, x.b @ x.a, 1e-9), x.name


def test_randomized_svd_is_near_optimal() -> None:
    """Layers above EXACT_SVD_MAX_DIM use a seeded randomized SVD: near the optimum, reproducible."""
    import lora_tools.blend.dense as dense

    gen = torch.Generator().manual_seed(0)
    matrix = (torch.randn(300, 12, generator=gen, dtype=torch.float64) * (0.7 ** torch.arange(12.0, dtype=torch.float64))) \
        @ torch.randn(12, 200, generator=gen, dtype=torch.float64) + 1e-3 * torch.randn(300, 200, generator=gen, dtype=torch.float64)
    sigma = torch.linalg.svdvals(matrix)
    optimal = float(torch.sum(sigma[:8] ** 2) / torch.sum(sigma**2))
    limit = dense.EXACT_SVD_MAX_DIM
    dense.EXACT_SVD_MAX_DIM = 16
    try:
        with dense.cpu_threads("cpu"):
            b, a, kept = refactor(matrix, 8, None, seed=3)
            b2, a2, _ = refactor(matrix, 8, None, seed=3)
    finally:
        dense.EXACT_SVD_MAX_DIM = limit
    assert kept == pytest.approx(optimal, rel=1e-6)
    assert torch.equal(b, b2) and torch.equal(a, a2)


def test_dare_seed_changes_the_masks(inputs: dict[str, Path]) -> None:
    adapters = [load_adapter(inputs["A"]), load_adapter(inputs["A2"])]
    run = functools.partial(blend_adapters, adapters, [0.5, 0.5], method="dare_linear", density=0.5, device="cpu")
    threads = torch.get_num_threads()
    first, again, other = run(seed=1), run(seed=1), run(seed=2)
    assert torch.get_num_threads() == threads  # the CPU thread policy is undone
    assert all(np.array_equal(x.a, y.a) for x, y in zip(first.layers, again.layers))
    assert not np.allclose(first.layers[0].b @ first.layers[0].a, other.layers[0].b @ other.layers[0].a)


# -- PEFT loads what we write -------------------------------------------------------------


def test_peft_loads_the_output_and_logits_match_the_dense_blend(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """No missing or unexpected keys; logits equal the base with Σ wᵢ·ΔWᵢ added to its weights."""
    from peft import PeftModel

    out, weights = tmp_path / "mix", [0.3, 1.2]
    blend([inputs["A"], inputs["B"]], out, weights, method="cat", dtype="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(_base_model(llama_base_dir), out).eval()
        reload = model.load_adapter(out, adapter_name="again")
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not reload.unexpected_keys and not [k for k in reload.missing_keys if "lora_" in k]
    model.set_adapter("default")
    model.double()  # PEFT widens bf16 factors to float32 only; compare in float64

    reference = _base_model(llama_base_dir)
    stored = load_adapter(out)  # the bf16 factors as stored: the reference must use them, not the float64 blend
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for layer in stored.layers:
            params[layer.name + ".weight"] += torch.from_numpy(layer.dense_update())
        tokens = torch.arange(20).reshape(2, 10) % 96
        np.testing.assert_allclose(model(tokens).logits.numpy(), reference(tokens).logits.numpy(), rtol=1e-9, atol=1e-9)
    expected = weighted_sum(llama_base_dir, [inputs["A"], inputs["B"]], weights)
    for layer in stored.layers:  # and bf16 rounding is all that separates them from the exact blend
        assert close(layer.dense_update(), expected[layer.name], 2e-2), layer.name


def test_modules_to_save_interpolate(inputs: dict[str, Path], llama_base_dir: Path, tmp_path: Path) -> None:
    """Both inputs save lm_head and the weights sum to 1: lm_head = Σ wᵢ·W'ᵢ, exactly W0 + Σ wᵢ(W'ᵢ − W0)."""
    out = tmp_path / "mts"
    report = blend([inputs["S1"], inputs["S2"]], out, [0.25], method="cat", dtype="fp64")
    assert report.full_tensors == ["lm_head.weight"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    written = peft_deltas(llama_base_dir, out)
    saved = [peft_deltas(llama_base_dir, inputs[k])["lm_head.weight"] for k in ("S1", "S2")]
    # stored in the inputs' dtype (F32): --dtype is for the factors only
    np.testing.assert_allclose(written["lm_head.weight"], 0.75 * saved[0] + 0.25 * saved[1], rtol=1e-7)
    assert load_numpy(str(out / "adapter_model.safetensors"))["base_model.model.lm_head.weight"].dtype == np.float32


def test_modules_to_save_refusals(inputs: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = run_cli("blend", inputs["S1"], inputs["A"], "--weight", 0.5, "-o", tmp_path / "x")
    assert code == 2 and str(inputs["A"]) in one_error_line(stderr) and "lm_head" in stderr
    code, _, stderr = run_cli("blend", inputs["S1"], inputs["S2"], "--weight", 1, "--weight", 1, "-o", tmp_path / "x")
    assert code == 2 and "sum to 1" in one_error_line(stderr)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["gpt2_conv1d", "llama_lora_bias"])
def test_fan_in_fan_out_and_lora_bias_survive(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str) -> None:
    """Blending an adapter with itself (0.25 + 0.75) gives it back, Conv1D orientation and lora_B.bias included."""
    case = peft_case_factory(kind)
    out = tmp_path / kind
    blend([case.adapter_dir, case.adapter_dir], out, [0.75], method="svd")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (kind == "gpt2_conv1d") and config["lora_bias"] is (kind == "llama_lora_bias")
    with torch.no_grad():
        tokens = torch.arange(16).reshape(2, 8) % 96
        ours = _peft_logits(case.base_dir, out, tokens)
        theirs = _peft_logits(case.base_dir, case.adapter_dir, tokens)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def _peft_logits(base_dir: Path, adapter: Path, tokens: torch.Tensor) -> np.ndarray:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base_model(base_dir, torch.float32), adapter).eval()
    return model(tokens).logits.numpy()


# -- refusals and the CLI ---------------------------------------------------------------------


def test_different_bases_are_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Same module paths, other shapes (a Llama with hidden 32): exit 2, the file named."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small-base")
    other = _make_peft(tmp_path / "small-base", tmp_path / "other", 9, r=8, lora_alpha=16, target_modules=["q_proj"])
    code, _, stderr = run_cli("blend", inputs["A"], other, "--weight", 0.5, "-o", tmp_path / "out")
    line = one_error_line(stderr)
    assert code == 2 and str(other) in line and "different base" in line
    assert not (tmp_path / "out").exists()


def test_dora_is_refused(peft_case_factory: Callable[[str], PeftCase], inputs: dict[str, Path], tmp_path: Path) -> None:
    dora = peft_case_factory("llama_dora").adapter_dir
    code, _, stderr = run_cli("blend", inputs["A"], dora, "--weight", 0.5, "-o", tmp_path / "out")
    line = one_error_line(stderr)
    assert code == 2 and str(dora) in line and "DoRA" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    ([], "got 0 --weight for 2 adapters"),
    (["--weight", "0.5", "--weight", "0.5", "--weight", "1"], "3 --weight for 2 adapters"),
    (["--weight", "0.5", "--method", "ties"], "needs --density"),
    (["--weight", "0.5", "--method", "cat", "--rank", "4"], "--rank and --energy apply"),
    (["--weight", "0.5", "--energy", "1.5"], "--energy must lie"),
    (["--weight", "0.5", "--format", "kohya"], "needs kohya inputs"),
])
def test_usage_errors(inputs: dict[str, Path], tmp_path: Path, args: list[str], message: str) -> None:
    code, _, stderr = run_cli("blend", inputs["A"], inputs["B"], *args, "-o", tmp_path / "out")
    assert code == 2 and message in one_error_line(stderr)
    assert not (tmp_path / "out").exists()


def test_out_must_not_exist_unless_force(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an earlier blend: what --force may replace (issue #12)
    (out / "keep.txt").write_text("old")
    code, _, stderr = run_cli("blend", inputs["A"], inputs["B"], "--weight", "-1", "--weight", "2", "-o", out)
    assert code == 2 and "already exists" in one_error_line(stderr) and (out / "keep.txt").exists()
    code, stdout, stderr = run_cli("blend", inputs["A"], inputs["B"], "--weight", "-1", "--weight", "2", "-o", out, "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "adapter_config.json").exists()
    assert "0.self_attn.q_proj" in stdout and "energy kept" in stdout  # the Rich table (names without "model.layers.")
    assert not [p for p in tmp_path.iterdir() if ".lora-tools-" in p.name]


def test_kohya_in_kohya_out(kohya_case, tmp_path: Path) -> None:
    """kohya files blend into a kohya file (conv kernels kept, .alpha = r)."""
    out = tmp_path / "mix.safetensors"
    code, _, stderr = run_cli("blend", kohya_case.lora_file, kohya_case.lora_file, "--weight", 0.3, "--method", "cat", "-o", out)
    assert code == 0, stderr
    source, written = load_adapter(kohya_case.lora_file), load_adapter(out)
    assert written.format == "kohya" and len(written.layers) == len(source.layers)
    tensors = load_numpy(str(out))
    for layer in source.layers:
        mine = written.layer(layer.name)
        assert mine.a.shape[1:] == layer.a.shape[1:] and mine.b.shape[2:] == layer.b.shape[2:]
        assert float(tensors[f"{layer.name}.alpha"]) == mine.rank == 2 * layer.rank
        np.testing.assert_allclose(mine.dense_update(), layer.dense_update(), rtol=2e-3, atol=2e-3)  # fp16 kept


def test_factored_path_never_imports_torch(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The real console script, and a check that cat/svd/linear ran without importing torch."""
    exe = Path(sys.executable).parent / "lora-tools"  # the installed entry point, else the module
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_tools"]
    done = subprocess.run([*command, "blend", str(inputs["A"]), str(inputs["B"]), "--weight", "0.5", "-o", str(tmp_path / "o"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_layers"] == 15
    script = (
        "import sys; from lora_tools.cli import cli\n"
        f"cli.main(['blend', {str(inputs['A'])!r}, {str(inputs['B'])!r}, '--weight', '0.5', '--method', 'svd',"
        f" '-o', {str(tmp_path / 'p')!r}, '--json'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- the small pieces -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_factored_svd_matches_dense(m: int, n: int, k: int, seed: int, duplicate: bool) -> None:
    """The Gram-based SVD of B·A equals numpy's dense SVD, rank-deficient stacks included:
    factored_svd (padded to min(m, n, r)) and truncate (the blend's, to the numerical rank)."""
    rng = np.random.default_rng(seed)
    b, a = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    if duplicate:  # an adapter blended with itself: [B | B]·[A; A]
        b, a = np.concatenate([b, b], axis=1), np.concatenate([a, -0.5 * a], axis=0)
    u, s, vt = factored_svd(b, a)
    dense = b @ a
    sigma = np.linalg.svd(dense, compute_uv=False)
    np.testing.assert_allclose(s, sigma[: s.size], atol=1e-9 * max(sigma[0], 1.0))
    np.testing.assert_allclose((u * s) @ vt, dense, atol=1e-9 * max(np.abs(dense).max(), 1.0))
    best = truncate(b, a.T, pad=False)
    np.testing.assert_allclose(best.singular_values[: s.size], s, atol=1e-9 * max(sigma[0], 1.0))
    np.testing.assert_allclose(best.b @ best.a, dense, atol=1e-9 * max(np.abs(dense).max(), 1.0))
    base, t, r = orthonormal_factor(b)
    q = base @ t
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-9)  # ≤ 1e-10 by design
    np.testing.assert_allclose(q @ r, b, atol=1e-12 * max(np.abs(b).max(), 1.0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=50))
def test_bf16_rounding_matches_torch(values: list[float]) -> None:
    x = np.asarray(values, dtype=np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(x), expected)


def test_bf16_rounding_matches_torch_across_chunks() -> None:
    """Many chunks, every exponent, ties, subnormals, ±0; float64 input rounds through float32 as torch does."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=300_001, dtype=np.uint64).astype(np.uint32)
    bits[::7] &= 0xFFFF8000  # exact ties and near-ties
    bits[::7] |= 0x8000
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 3.3e38)].reshape(-1, 1)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(x), expected)
    wide = rng.standard_normal((513, 257)) * 10.0 ** rng.integers(-40, 38, size=(513, 257))
    expected = torch.from_numpy(wide).to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bf16_bits(wide), expected)
    assert float32_to_bf16_bits(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_single_threaded_blas_restores_the_thread_count() -> None:
    """The factored blend runs OpenBLAS on one thread and gives the setting back (where it can)."""
    import ctypes

    from lora_tools.linalg.blas import single_threaded_blas

    paths = sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                    if "openblas" in line.lower() and ".so" in line}) if Path("/proc/self/maps").exists() else []
    getters = [getattr(ctypes.CDLL(p), "scipy_openblas_get_num_threads64_", None) for p in paths]
    getters = [g for g in getters if g is not None]
    if not getters:
        pytest.skip("numpy does not use a scipy-openblas this test can query")
    before = [g() for g in getters]
    with single_threaded_blas():
        assert [g() for g in getters] == [1] * len(getters)
    assert [g() for g in getters] == before
