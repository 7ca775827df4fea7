"""`lora-tools extract` (issue #17): a LoRA from a full fine-tune, against a dense float64
numpy SVD of D = W_tuned − W_base, against the known adapter PEFT merged into TUNED, loaded
by PEFT, merged back with `lora-tools merge`, in kohya form, and on bad input (exit 2, one
line, nothing written). Real and offline: every TUNED is built here from the tiny seeded
bases of tests/builders.py (PEFT's own merge_and_unload, or seeded dense perturbations
written with safetensors), and every reference is numpy or PEFT, sharing no code with
lora_tools.extract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import PeftCase, build_peft_case, build_sd_base
from cli_run import run_cli
from safetensors.numpy import load_file, save_file

from lora_tools.formats import load_adapter
from lora_tools.formats.names import resolve_names
from lora_tools.io.checkpoint import BaseCheckpoint

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
GATE1 = "model.layers.1.mlp.gate_proj"
# module -> geometric decay of its singular values (different, so the policies pick different ranks)
DENSE_DECAYS = {Q0: 0.8, V1: 0.6, DOWN0: 0.9, GATE1: 0.7}


# -- building TUNED --------------------------------------------------------------------


def _weights(folder: Path) -> dict[str, np.ndarray]:
    """The tensors of a single-file HF folder (the tiny bases are one model.safetensors)."""
    return load_file(folder / "model.safetensors")


def _write_tuned(base_dir: Path, out: Path, tensors: dict[str, np.ndarray]) -> Path:
    """An HF folder: BASE's config.json and `tensors` as model.safetensors."""
    out.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", out / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _spectral_perturbation(rng: np.random.Generator, shape: tuple[int, ...], decay: float, top: float = 0.5) -> np.ndarray:
    """A full-rank float64 matrix U·diag(σ)·Vᵀ whose σᵢ decay geometrically (jittered)."""
    m, n = shape[0], int(np.prod(shape[1:]))
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    sigma = top * decay ** np.arange(k) * np.exp(0.1 * rng.standard_normal(k))
    return ((u * np.sort(sigma)[::-1]) @ v.T).reshape(shape)


def _diff(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], key: str) -> np.ndarray:
    """D = W_tuned − W_base in float64, as a matrix (out, in·k)."""
    d = tuned[key].astype(np.float64) - base[key].astype(np.float64)
    return d.reshape(d.shape[0], -1)


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extract_fixtures")


@pytest.fixture(scope="module")
def plain_case(fixtures_dir: Path) -> PeftCase:
    return build_peft_case("llama_plain", fixtures_dir)


@pytest.fixture(scope="module")
def merged_tuned(plain_case: PeftCase, fixtures_dir: Path) -> Path:
    """TUNED = PEFT's own merge_and_unload() of the rank-4 llama_plain adapter, float32."""
    out = fixtures_dir / "tuned-merged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_case.peft_model().merge_and_unload().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dense_tuned(plain_case: PeftCase, fixtures_dir: Path) -> Path:
    """TUNED = base + a seeded full-rank perturbation of four weights (q, v, down, gate), float32."""
    base = _weights(plain_case.base_dir)
    rng = np.random.default_rng(1717)
    tuned = dict(base)
    for module, decay in DENSE_DECAYS.items():
        key = module + ".weight"
        tuned[key] = (base[key].astype(np.float64) + _spectral_perturbation(rng, base[key].shape, decay)).astype(np.float32)
    return _write_tuned(plain_case.base_dir, fixtures_dir / "tuned-dense", tuned)


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _extract_json(*args: object) -> dict:
    code, stdout, stderr = run_cli("extract", *args, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def _report_layers(report: dict) -> dict[str, dict]:
    return {_module(layer["name"]): layer for layer in report["layers"]}


def _expected_rank(sigma: np.ndarray, args: list[str]) -> int:
    """The rank a policy should pick, from numpy's σ (independent code)."""
    opts = dict(zip(args[::2], args[1::2]))
    energy, total = np.cumsum(sigma**2), float(np.sum(sigma**2))
    if "--energy" in opts:
        k = int(np.argmax(energy >= float(opts["--energy"]) * total * (1 - 1e-12))) + 1
    elif "--sv-ratio" in opts:
        k = int(np.sum(sigma > sigma[0] / float(opts["--sv-ratio"])))
    else:
        k = len(sigma)
    if "--rank" in opts:
        k = min(k, int(opts["--rank"]))
    return max(k, int(opts.get("--min-rank", 1)))


def _check_truncations(base_dir: Path, tuned_dir: Path, out: Path, report: dict, rtol: float = 1e-9) -> dict[str, int]:
    """Every written layer is the float64 Eckart–Young truncation of D at its rank, with
    balanced factors (‖B e_i‖ = ‖A_i‖) and scale 1, and the report's numbers are D's.
    Returns the ranks written."""
    base, tuned = _weights(base_dir), _weights(tuned_dir)
    written = load_adapter(out)
    layers = _report_layers(report)
    assert sorted(layer.name for layer in written.layers) == sorted(layers)
    ranks = {}
    for name, entry in layers.items():
        d = _diff(base, tuned, name + ".weight")
        u, sigma, vt = np.linalg.svd(d, full_matrices=False)
        layer = written.layer(name)
        k = layer.rank
        assert entry["rank"] == k, name
        assert layer.scale == pytest.approx(1.0, rel=1e-12), (name, layer.alpha, k)
        got = layer.dense_update().reshape(d.shape)
        best = (u[:, :k] * sigma[:k]) @ vt[:k]
        norm = float(np.linalg.norm(d))
        assert np.linalg.norm(got - best) <= rtol * norm, (name, np.linalg.norm(got - best) / norm)
        b, a = np.asarray(layer.b_matrix, dtype=np.float64), np.asarray(layer.a_matrix, dtype=np.float64)
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=max(rtol, 1e-6))
        residual = float(np.sqrt(np.sum(sigma[k:] ** 2)))
        assert entry["residual_fro"] == pytest.approx(residual, rel=1e-6, abs=1e-12 * norm), name
        assert entry["diff_fro"] == pytest.approx(norm, rel=1e-9), name
        base_fro = float(np.linalg.norm(base[name + ".weight"].astype(np.float64)))
        assert entry["base_fro"] == pytest.approx(base_fro, rel=1e-9), name
        assert entry["relative_diff"] == pytest.approx(norm / base_fro, rel=1e-9), name
        assert entry["relative_error"] == pytest.approx(residual / norm, rel=1e-6, abs=1e-12), name
        assert entry["energy_kept"] == pytest.approx(float(np.sum(sigma[:k] ** 2)) / norm**2, abs=1e-9), name
        assert list(entry["shape"]) == list(base[name + ".weight"].shape), name
        ranks[name] = k
    worst = max(layers.values(), key=lambda e: e["relative_error"])
    assert _module(report["worst_layer"]) == _module(worst["name"])
    assert report["worst_relative_error"] == pytest.approx(worst["relative_error"], rel=1e-12)
    assert report["n_layers"] == len(layers)
    return ranks


# -- 1. exactness on PEFT's own merge --------------------------------------------------


def test_recovers_the_merged_adapter(plain_case: PeftCase, merged_tuned: Path, tmp_path: Path) -> None:
    """TUNED = merge_and_unload of a known rank-4 adapter: --rank 4 gives back its s·B·A to
    the fp32 noise of the merge, and --energy 0.999999 finds rank 4 in every layer."""
    adapter = load_adapter(plain_case.adapter_dir)
    out = tmp_path / "r4"
    report = _extract_json(plain_case.base_dir, merged_tuned, "-o", out, "--rank", "4")
    written = load_adapter(out)
    assert sorted(layer.name for layer in written.layers) == sorted(layer.name for layer in adapter.layers)
    assert report["full_tensors"] == [] and not written.full_tensors
    for layer in adapter.layers:
        expected = layer.dense_update()
        got = written.layer(layer.name).dense_update()
        assert written.layer(layer.name).rank == 4
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), layer.name
        sigma = np.linalg.svd(expected.reshape(expected.shape[0], -1), compute_uv=False)
        assert sigma[3] ** 2 > 1e-4 * np.sum(sigma**2), layer.name  # precondition: rank 3 loses more than 1e-6

    from lora_tools.extract import extract

    energy = extract(plain_case.base_dir, merged_tuned, tmp_path / "energy", energy=0.999999).to_json()
    assert {_module(entry["name"]): entry["rank"] for entry in energy["layers"]} == {layer.name: 4 for layer in adapter.layers}
    assert json.loads(json.dumps(energy)) == energy  # the --json document is plain JSON


# -- 2. against dense float64 ------------------------------------------------------------


def test_exact_is_the_float64_eckart_young_truncation(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    out = tmp_path / "exact"
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", out, "--exact", "--rank", "3", "--dtype", "fp64")
    ranks = _check_truncations(plain_case.base_dir, dense_tuned, out, report)
    assert ranks == {name: 3 for name in DENSE_DECAYS}
    assert report["full_tensors"] == [] and report["method"] == "exact"
    assert all(entry["method"] == "exact" for entry in report["layers"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert report["params"] == sum(3 * sum(_weights(plain_case.base_dir)[m + ".weight"].shape) for m in DENSE_DECAYS)


def test_randomized_is_within_one_percent_of_the_exact_residual(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    base, tuned = _weights(plain_case.base_dir), _weights(dense_tuned)
    out = tmp_path / "randomized"
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", out, "--randomized", "--rank", "3", "--dtype", "fp64")
    written = load_adapter(out)
    layers = _report_layers(report)
    assert sorted(layers) == sorted(DENSE_DECAYS)
    for name, entry in layers.items():
        d = _diff(base, tuned, name + ".weight")
        sigma = np.linalg.svd(d, compute_uv=False)
        exact = float(np.sqrt(np.sum(sigma[3:] ** 2)))
        assert entry["rank"] == 3 and entry["method"] == "randomized", entry
        assert exact * (1 - 1e-9) <= entry["residual_fro"] <= 1.01 * exact, (name, entry["residual_fro"], exact)
        actual = float(np.linalg.norm(d - written.layer(name).dense_update().reshape(d.shape)))
        assert entry["residual_fro"] == pytest.approx(actual, rel=1e-6), name  # the report is the written factors' error


# -- 3. policies ---------------------------------------------------------------------------

POLICIES: dict[str, list[str]] = {
    "energy": ["--energy", "0.9"],
    "sv_ratio": ["--sv-ratio", "4"],
    "rank_cap": ["--energy", "0.99", "--rank", "5"],
    "min_rank": ["--sv-ratio", "1.5", "--min-rank", "3"],
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_ranks_match_numpy(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path, policy: str) -> None:
    base, tuned = _weights(plain_case.base_dir), _weights(dense_tuned)
    out = tmp_path / "policy"
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", out, *POLICIES[policy], "--dtype", "fp64")
    ranks = _check_truncations(plain_case.base_dir, dense_tuned, out, report)
    expected = {name: _expected_rank(np.linalg.svd(_diff(base, tuned, name + ".weight"), compute_uv=False), POLICIES[policy])
                for name in DENSE_DECAYS}
    assert ranks == expected
    if policy == "energy":
        assert len(set(expected.values())) > 1  # the case does exercise per-layer ranks


@pytest.mark.parametrize("share", [0.1, 0.3])
def test_budget_is_respected(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path, share: float) -> None:
    base = _weights(plain_case.base_dir)
    costs = {name: sum(base[name + ".weight"].shape) for name in DENSE_DECAYS}
    full = sum(min(base[name + ".weight"].shape) * c for name, c in costs.items())
    budget = int(share * full)
    out = tmp_path / "budget"
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", out, "--budget", budget, "--dtype", "fp64")
    ranks = _check_truncations(plain_case.base_dir, dense_tuned, out, report)
    used = sum(ranks[name] * c for name, c in costs.items())
    assert used <= budget, (used, budget, ranks)
    assert used > budget - max(costs.values()), (used, budget, ranks)  # no layer could have taken one more rank
    assert all(k >= 1 for k in ranks.values())
    assert report["params"] == used


def test_modules_and_exclude_select_layers(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", tmp_path / "q", "--rank", "2", "--modules", "q_proj|down_proj")
    assert sorted(_report_layers(report)) == sorted([Q0, DOWN0])
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", tmp_path / "x", "--rank", "2", "--exclude", "mlp")
    assert sorted(_report_layers(report)) == sorted([Q0, V1])


# -- 4. PEFT loads it; merge → TUNED; verify -------------------------------------------


def _peft_load(base_dir: Path, adapter: Path, dtype: torch.dtype) -> torch.nn.Module:
    """PeftModel.from_pretrained, failing on any missing/unexpected-key warning."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model


def _merge_back(base_dir: Path, adapter: Path, merged: Path) -> dict[str, np.ndarray]:
    code, _, stderr = run_cli("merge", base_dir, adapter, "-o", merged, "-q")
    assert code == 0, stderr
    with BaseCheckpoint.open(merged) as checkpoint:
        return {name: checkpoint.numpy(name) for name in checkpoint.tensor_names()}


def test_peft_loads_it_and_merge_gives_back_tuned(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    out, merged_dir = tmp_path / "lora", tmp_path / "merged"
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", out, "--energy", "0.9")
    layers = _report_layers(report)
    assert len({entry["rank"] for entry in layers.values()}) > 1  # rank_pattern/alpha_pattern in use
    written = load_adapter(out)

    model = _peft_load(plain_case.base_dir, out, torch.float64)
    base64 = _base_model_state(plain_case.base_dir)
    peft_merged = model.merge_and_unload().state_dict()
    for name in layers:
        key = name + ".weight"
        np.testing.assert_allclose((peft_merged[key] - base64[key]).numpy(), written.layer(name).dense_update(),
                                   rtol=1e-9, atol=1e-12)

    base, tuned = _weights(plain_case.base_dir), _weights(dense_tuned)
    merged = _merge_back(plain_case.base_dir, out, merged_dir)
    assert sorted(merged) == sorted(tuned)
    for key, want in tuned.items():
        got = merged[key].astype(np.float64)
        if _module(key) in layers:
            entry = layers[_module(key)]
            error = float(np.linalg.norm(got - want.astype(np.float64)))
            tol = 1e-5 * entry["diff_fro"] + 1e-6 * float(np.linalg.norm(want.astype(np.float64)))
            assert abs(error - entry["residual_fro"]) <= tol, (key, error, entry["residual_fro"])
        else:
            np.testing.assert_array_equal(merged[key], base[key], err_msg=key)
    code, stdout, stderr = run_cli("verify", plain_case.base_dir, out, merged_dir)
    assert code == 0, stdout + stderr


def _base_model_state(base_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64).state_dict()


# -- 5. full tensors -----------------------------------------------------------------------


def test_norms_embeddings_and_lm_head_are_full_tensors(plain_case: PeftCase, tmp_path: Path) -> None:
    base = _weights(plain_case.base_dir)
    rng = np.random.default_rng(5)
    tuned = dict(base)
    full = ["model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"]
    for key in full:
        tuned[key] = (base[key] + 0.01 * rng.standard_normal(base[key].shape)).astype(np.float32)
    tuned[Q0 + ".weight"] = (base[Q0 + ".weight"] + _spectral_perturbation(rng, (64, 64), 0.5)).astype(np.float32)
    tuned_dir = _write_tuned(plain_case.base_dir, tmp_path / "tuned", tuned)
    out = tmp_path / "lora"
    report = _extract_json(plain_case.base_dir, tuned_dir, "-o", out, "--rank", "4")
    assert sorted(report["full_tensors"]) == sorted(full)
    assert sorted(_report_layers(report)) == [Q0]
    written = load_adapter(out)
    assert sorted(written.full_tensors) == sorted(full)
    for key in full:
        np.testing.assert_array_equal(np.asarray(written.full_tensors[key]), tuned[key], err_msg=key)

    merged = _merge_back(plain_case.base_dir, out, tmp_path / "merged")
    for key in full:
        np.testing.assert_array_equal(merged[key], tuned[key], err_msg=key)
    for key in set(tuned) - set(full) - {Q0 + ".weight"}:
        np.testing.assert_array_equal(merged[key], base[key], err_msg=key)

    # PEFT takes them as modules_to_save: its merge gives TUNED's tensors too
    state = _peft_load(plain_case.base_dir, out, torch.float32).merge_and_unload().state_dict()
    for key in full:
        np.testing.assert_array_equal(state[key].numpy(), tuned[key], err_msg=key)


def test_single_file_conv_and_bias(fixtures_dir: Path, tmp_path: Path) -> None:
    """Single .safetensors BASE and TUNED: a 3×3 conv is extracted as (out, in·k) and written
    with its kernel shape; its changed bias and a changed norm weight go in whole."""
    base_file = build_sd_base(fixtures_dir)
    base = load_file(base_file)
    rng = np.random.default_rng(9)
    conv, to_q = "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tuned = dict(base)
    for module, decay in ((conv, 0.8), (to_q, 0.7)):
        key = module + ".weight"
        tuned[key] = (base[key] + _spectral_perturbation(rng, base[key].shape, decay)).astype(np.float32)
    full = [conv + ".bias", "down_blocks.0.resnets.0.norm1.weight"]
    for key in full:
        tuned[key] = (base[key] + 0.01 * rng.standard_normal(base[key].shape)).astype(np.float32)
    tuned_file = tmp_path / "tuned.safetensors"
    save_file(tuned, tuned_file)
    out = tmp_path / "lora"
    report = _extract_json(base_file, tuned_file, "-o", out, "--exact", "--rank", "3", "--dtype", "fp64")
    assert sorted(report["full_tensors"]) == sorted(full)
    written = load_adapter(out)
    layers = _report_layers(report)
    assert sorted(layers) == sorted([conv, to_q])
    for name in layers:
        d = _diff(base, tuned, name + ".weight")
        u, sigma, vt = np.linalg.svd(d, full_matrices=False)
        layer = written.layer(name)
        assert layer.weight_shape == base[name + ".weight"].shape
        assert (layer.kind == "conv") == (name == conv)
        got = layer.dense_update()
        assert got.shape == base[name + ".weight"].shape
        assert np.linalg.norm(got.reshape(d.shape) - (u[:, :3] * sigma[:3]) @ vt[:3]) <= 1e-9 * np.linalg.norm(d), name
        assert layers[name]["residual_fro"] == pytest.approx(float(np.sqrt(np.sum(sigma[3:] ** 2))), rel=1e-6)
    for key in full:
        np.testing.assert_array_equal(np.asarray(written.full_tensors[key]), tuned[key], err_msg=key)

    merged = _merge_back(base_file, out, tmp_path / "merged.safetensors")
    for key in full:
        np.testing.assert_array_equal(merged[key], tuned[key], err_msg=key)
    for name in layers:
        key = name + ".weight"
        error = float(np.linalg.norm(merged[key].astype(np.float64) - tuned[key].astype(np.float64)))
        assert error == pytest.approx(layers[name]["residual_fro"], rel=1e-5, abs=1e-6 * float(np.linalg.norm(tuned[key].astype(np.float64)))), key


# -- 6. kohya --------------------------------------------------------------------------------


def test_kohya_output_resolves_and_matches_peft(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    peft_out, kohya_out = tmp_path / "peft", tmp_path / "lora.safetensors"
    args = ["--exact", "--energy", "0.9", "--dtype", "fp64"]
    peft_report = _extract_json(plain_case.base_dir, dense_tuned, "-o", peft_out, *args)
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", kohya_out, *args, "--format", "kohya")
    assert report["format"] == "kohya"
    kohya = load_adapter(kohya_out)
    assert kohya.format == "kohya"
    assert all("." not in layer.name for layer in kohya.layers)  # kohya's flattened names, not module paths
    with BaseCheckpoint.open(plain_case.base_dir) as checkpoint:
        resolved = resolve_names(kohya, checkpoint.module_paths(), plain_case.base_dir)
    peft = load_adapter(peft_out)
    assert sorted(layer.name for layer in resolved.layers) == sorted(layer.name for layer in peft.layers) == sorted(DENSE_DECAYS)
    for layer in resolved.layers:
        expected = peft.layer(layer.name).dense_update()
        assert layer.rank == peft.layer(layer.name).rank
        np.testing.assert_allclose(layer.dense_update(), expected, rtol=0, atol=1e-12 * np.abs(expected).max(), err_msg=layer.name)
    _check_truncations(plain_case.base_dir, dense_tuned, peft_out, peft_report)
    assert sorted(_report_layers(report)) == sorted(_report_layers(peft_report))  # module paths in either format


# -- 7. bad input --------------------------------------------------------------------------


def _assert_refused(args: list[object], out: Path, *needles: str) -> str:
    code, stdout, stderr = run_cli("extract", *args, "-o", out)
    assert code == 2 and stdout == "", (code, stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    assert not out.exists()
    return stderr


def test_tuned_equal_to_base_is_refused(plain_case: PeftCase, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(plain_case.base_dir, copy)
    _assert_refused([plain_case.base_dir, copy, "--rank", "4"], tmp_path / "o", "TUNED equals BASE")


def test_a_tensor_of_another_shape_is_refused(plain_case: PeftCase, tmp_path: Path) -> None:
    base = _weights(plain_case.base_dir)
    tuned = dict(base)
    victim = "model.layers.1.self_attn.o_proj.weight"
    tuned[victim] = base[victim][:, :63].copy()
    tuned[Q0 + ".weight"] = base[Q0 + ".weight"] + np.float32(0.01)
    tuned_dir = _write_tuned(plain_case.base_dir, tmp_path / "tuned", tuned)
    stderr = _assert_refused([plain_case.base_dir, tuned_dir, "--rank", "4"], tmp_path / "o", victim)
    assert str(tuned_dir) in stderr or str(plain_case.base_dir) in stderr, stderr


def test_a_missing_tensor_is_refused(plain_case: PeftCase, tmp_path: Path) -> None:
    base = _weights(plain_case.base_dir)
    victim = "model.layers.1.mlp.up_proj.weight"
    tuned = {k: v for k, v in base.items() if k != victim}
    tuned[Q0 + ".weight"] = base[Q0 + ".weight"] + np.float32(0.01)
    tuned_dir = _write_tuned(plain_case.base_dir, tmp_path / "tuned", tuned)
    stderr = _assert_refused([plain_case.base_dir, tuned_dir, "--rank", "4"], tmp_path / "o", victim)
    assert str(tuned_dir) in stderr or str(plain_case.base_dir) in stderr, stderr


def test_another_architecture_is_refused(peft_case_factory: Callable[[str], PeftCase], plain_case: PeftCase, tmp_path: Path) -> None:
    gpt2 = peft_case_factory("gpt2_conv1d").base_dir
    _assert_refused([gpt2, plain_case.base_dir, "--rank", "4"], tmp_path / "o")
    _assert_refused([plain_case.base_dir, gpt2, "--rank", "4"], tmp_path / "o2")


@pytest.mark.parametrize(("args", "needle"), [
    ([], ""),
    (["--energy", "1.5"], "--energy"),
    (["--energy", "0"], "--energy"),
    (["--sv-ratio", "0.5"], "--sv-ratio"),
    (["--rank", "0"], "--rank"),
    (["--budget", "0"], "--budget"),
    (["--rank", "2", "--min-rank", "3"], "--min-rank"),
    (["--rank", "2", "--modules", "("], "--modules"),
])
def test_bad_policy_is_refused(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    stderr = _assert_refused([plain_case.base_dir, dense_tuned, *args], tmp_path / "o", needle)
    if not args:
        assert "policy" in stderr or "--rank" in stderr, stderr


def test_existing_out_needs_force(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    code, _, stderr = run_cli("extract", plain_case.base_dir, dense_tuned, "-o", out, "--rank", "2")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert not any(out.iterdir())
    code, _, stderr = run_cli("extract", plain_case.base_dir, dense_tuned, "-o", out, "--rank", "2", "--force")
    assert code == 0, stderr
    assert (out / "adapter_config.json").is_file()


# -- 8. peer: mergekit-extract-lora ----------------------------------------------------------


@pytest.mark.slow
def test_same_residuals_as_mergekit(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    """mergekit-extract-lora at a fixed rank (full SVD, in float32) leaves the same residual
    ‖D − B·A‖ per layer as extract. mergekit lives in its own venv (it pins other versions
    of the stack); point MERGEKIT_EXTRACT at its mergekit-extract-lora binary."""
    binary = os.environ.get("MERGEKIT_EXTRACT")
    if not binary:
        pytest.fail("set MERGEKIT_EXTRACT to a mergekit-extract-lora binary, e.g. from "
                    "`python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit` (not into the project venv)")
    rank = 3
    theirs = tmp_path / "mergekit"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([binary, "--model", str(dense_tuned), "--base-model", str(plain_case.base_dir), "--out-path", str(theirs),
                           "--max-rank", str(rank), "--no-copy-tokenizer", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = _extract_json(plain_case.base_dir, dense_tuned, "-o", tmp_path / "ours", "--exact", "--rank", rank)
    ours = _report_layers(report)
    base, tuned = _weights(plain_case.base_dir), _weights(dense_tuned)
    peer = load_adapter(theirs)
    assert sorted(layer.name for layer in peer.layers if layer.name in ours) == sorted(ours)
    for name, entry in ours.items():
        d = _diff(base, tuned, name + ".weight")
        residual = float(np.linalg.norm(d - peer.layer(name).dense_update().reshape(d.shape)))
        assert entry["residual_fro"] == pytest.approx(residual, rel=1e-5, abs=1e-6 * entry["diff_fro"]), (name, entry["residual_fro"], residual)


# --------------------------------------------------------------------------- the torch (GPU) path, run on the CPU


def test_device_svd_matches_numpy() -> None:
    """linalg.device_svd (what --device cuda runs) on a CPU tensor: the exact SVD equals
    numpy's, the randomized one finds the same top singular values, and both report ‖D‖²."""
    import torch

    from lora_tools.extract.layers import decompose
    from lora_tools.linalg.rank_policy import RankPolicy

    rng = np.random.default_rng(11)
    d = (rng.standard_normal((90, 60)) * np.logspace(0, -3, 60)) @ rng.standard_normal((60, 60))
    policy = RankPolicy(rank=6)
    exact = np.linalg.svd(d, compute_uv=False)
    for method, rtol in (("exact", 1e-9), ("randomized", 1e-4)):  # two RNG streams: sketches differ, both near σ
        spec_np, _, s_np, _ = decompose(d, method, policy, 0)
        spec_t, u, s, vt = decompose(torch.from_numpy(d), method, policy, 0)
        assert spec_t.total_sq == pytest.approx(spec_np.total_sq, rel=1e-12)
        np.testing.assert_allclose(s[:6], exact[:6], rtol=rtol)
        np.testing.assert_allclose(s_np[:6], exact[:6], rtol=rtol)
        kept = (u[:, :6] * s[:6]) @ vt[:6]
        assert np.linalg.norm(d - kept) ** 2 == pytest.approx(spec_t.total_sq - float(np.sum(s[:6] ** 2)), rel=1e-9)


def test_torch_path_gives_the_numpy_result(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole extract through the device code (torch on the CPU standing in for CUDA)."""
    import torch

    import lora_tools.extract.operation as operation
    from lora_tools.extract import extract
    from lora_tools.formats import load_adapter

    reference = extract(plain_case.base_dir, dense_tuned, tmp_path / "numpy", rank=3, method="exact", dtype="fp64")
    monkeypatch.setattr(operation, "_gpu", lambda device: torch.device("cpu"))
    through = extract(plain_case.base_dir, dense_tuned, tmp_path / "torch", rank=3, method="exact", dtype="fp64")
    for a, b in zip(reference.layers, through.layers):
        assert (a.name, a.rank) == (b.name, b.rank)
        assert b.residual_fro == pytest.approx(a.residual_fro, rel=1e-9) and b.base_fro == pytest.approx(a.base_fro, rel=1e-12)
    numpy_layers, torch_layers = load_adapter(tmp_path / "numpy").layers, load_adapter(tmp_path / "torch").layers
    for a, b in zip(numpy_layers, torch_layers):
        np.testing.assert_allclose(b.dense_update(), a.dense_update(), rtol=0, atol=1e-9 * np.abs(a.dense_update()).max())


def test_cuda_without_a_gpu_is_one_line_exit_2(plain_case: PeftCase, dense_tuned: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the request is valid here")
    code, stdout, stderr = run_cli("extract", plain_case.base_dir, dense_tuned, "--rank", "2", "--device", "cuda",
                                   "-o", tmp_path / "o")
    assert code == 2 and "CUDA is not available" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
