"""`lora-tools resize`: every policy against a dense float64 Eckart–Young truncation, PEFT
loading the output, --bake under one global alpha/r rule, the --budget bounds, the other
formats, resize → merge → verify, and bad input (exit 2, one line). Real and offline."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import KohyaCase, PeftCase
from cli_run import run_cli
from safetensors.numpy import load_file

from lora_tools.formats import load_adapter
from lora_tools.linalg.rank_policy import sv_cumulative_rank, sv_fro_rank, sv_ratio_rank
from lora_tools.resize import resize

POLICIES: dict[str, list[str]] = {
    "rank": ["--rank", "2"],
    "energy": ["--energy", "0.9"],
    "sv_ratio": ["--sv-ratio", "2.5"],
    "sv_fro": ["--sv-fro", "0.9"],
    "sv_cumulative": ["--sv-cumulative", "0.7"],
    "rank_cap": ["--energy", "0.999", "--rank", "3"],
    "min_rank": ["--sv-ratio", "1", "--min-rank", "2"],
}
KINDS = ["llama_plain", "llama_rslora", "llama_patterns", "llama_embedding", "gpt2_conv1d", "llama_dora",
         "llama_lora_bias", "llama_modules_to_save"]


def _matrix(update: np.ndarray) -> np.ndarray:
    return update.reshape(update.shape[0], -1)


def _expected_rank(sigma: np.ndarray, args: list[str]) -> int:
    """The rank each policy should pick, computed here from numpy's σ (independent code)."""
    opts = dict(zip(args[::2], args[1::2]))
    sigma = sigma[sigma > sigma[0] * 1e-12]
    energy, total = np.cumsum(sigma**2), float(np.sum(sigma**2))
    if "--energy" in opts:
        k = int(np.argmax(energy >= float(opts["--energy"]) * total * (1 - 1e-12))) + 1
    elif "--sv-ratio" in opts:
        k = max(1, int(np.sum(sigma > sigma[0] / float(opts["--sv-ratio"]))))
    elif "--sv-fro" in opts:
        k = int(np.argmax(np.sqrt(energy / total) >= float(opts["--sv-fro"]) * (1 - 1e-12))) + 1
    elif "--sv-cumulative" in opts:
        k = int(np.argmax(np.cumsum(sigma) / sigma.sum() >= float(opts["--sv-cumulative"]) * (1 - 1e-12))) + 1
    else:
        k = len(sigma)
    if "--rank" in opts:
        k = min(k, int(opts["--rank"]))
    return max(k, int(opts.get("--min-rank", 1)))


def check_truncation(source_path: Path, out: Path, args: list[str] | None) -> dict[str, int]:
    """Each written layer is the Eckart–Young truncation of the input's ΔW (float64), its
    residual √(Σ discarded σ²) to 1e-9 relative; returns the ranks written."""
    source, written = load_adapter(source_path), load_adapter(out)
    ranks = {}
    for layer in source.layers:
        delta = _matrix(layer.dense_update())
        u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
        got = _matrix(written.layer(layer.name).dense_update())
        k = written.layer(layer.name).rank
        if args is not None:
            assert k == min(_expected_rank(sigma, args), layer.rank), (layer.name, k)
        best = (u[:, :k] * sigma[:k]) @ vt[:k]
        norm = np.linalg.norm(delta)
        assert np.linalg.norm(got - best) <= 1e-9 * norm, layer.name
        residual = np.sqrt(np.sum(sigma[k:] ** 2))
        assert abs(np.linalg.norm(delta - got) - residual) <= 1e-9 * norm, layer.name
        if layer.magnitude is not None:
            np.testing.assert_array_equal(np.asarray(written.layer(layer.name).magnitude), np.asarray(layer.magnitude))
        if layer.bias is not None:
            np.testing.assert_allclose(np.asarray(written.layer(layer.name).bias), np.asarray(layer.bias), rtol=1e-15)
        ranks[layer.name] = k
    return ranks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_is_the_eckart_young_truncation(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path,
                                                     kind: str, policy: str) -> None:
    case = peft_case_factory(kind)
    out = tmp_path / "small"
    code, stdout, stderr = run_cli("resize", case.adapter_dir, "-o", out, *POLICIES[policy], "--dtype", "fp64", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    ranks = check_truncation(case.adapter_dir, out, POLICIES[policy])
    assert {layer["name"]: layer["rank_out"] for layer in report["layers"]} == ranks
    source, written = load_adapter(case.adapter_dir), load_adapter(out)
    assert sorted(written.full_tensors) == sorted(source.full_tensors) == report["full_tensors"]
    for key, tensor in source.full_tensors.items():
        np.testing.assert_array_equal(np.asarray(written.full_tensors[key]), np.asarray(tensor))
    assert written.config.get("use_rslora", False) == source.config.get("use_rslora", False)
    assert report["dtype"] == "F64" and report["params_out"] == written.n_params
    assert ("DoRA" in " ".join(report["notes"])) == (kind == "llama_dora")
    for layer in report["layers"]:
        assert abs(layer["relative_error"] ** 2 + layer["energy_kept"] - 1.0) < 1e-9


@pytest.mark.parametrize("kind", ["llama_plain", "llama_rslora", "llama_patterns", "llama_dora"])
def test_peft_loads_the_output_and_merges_the_truncated_update(peft_case_factory: Callable[[str], PeftCase],
                                                               tmp_path: Path, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = peft_case_factory(kind)
    out = tmp_path / "small"
    resize(case.adapter_dir, out, energy=0.8, dtype="fp64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float64)
        model = PeftModel.from_pretrained(base, out).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    if kind == "llama_dora":
        return  # DoRA's merge renormalises W0 + ΔW; loading with every key is what is checked here
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float64).state_dict().items()}
    merged = model.merge_and_unload().state_dict()
    written = load_adapter(out)
    for layer in written.layers:
        key = layer.name + ".weight"
        np.testing.assert_allclose((merged[key] - before[key]).numpy(), layer.dense_update(), atol=1e-12, rtol=1e-9)
    check_truncation(case.adapter_dir, out, None)


def _with_one_zero_layer(adapter_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the adapter whose first lora_B is all zero, and that layer's name."""
    import shutil

    from safetensors.numpy import save_file

    src = tmp_path / "zeroed"
    shutil.copytree(adapter_dir, src)
    tensors = load_file(src / "adapter_model.safetensors")
    victim = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[victim] = np.zeros_like(tensors[victim])
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    return src, victim.removeprefix("base_model.model.").removesuffix(".lora_B.weight")


@pytest.mark.parametrize("kind", ["llama_plain", "llama_rslora", "llama_patterns"])
@pytest.mark.parametrize("policy", [[], ["--rank", "2"]])
def test_bake_is_exact_under_one_global_alpha_over_r(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path,
                                                     kind: str, policy: list[str]) -> None:
    case = peft_case_factory(kind)
    out = tmp_path / "baked"
    code, _, stderr = run_cli("resize", case.adapter_dir, "-o", out, "--bake", *policy, "--dtype", "fp64")
    assert code == 0, stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["use_rslora"] and not config["alpha_pattern"]
    tensors = load_file(out / "adapter_model.safetensors")
    source = load_adapter(case.adapter_dir)
    for layer in source.layers:
        stem = f"base_model.model.{layer.name}"
        b, a = tensors[f"{stem}.lora_B.weight"], tensors[f"{stem}.lora_A.weight"]
        scale = config["lora_alpha"] / a.shape[0]  # one global alpha over the tensor's rank (llama.cpp, TensorRT-LLM)
        if not policy:
            assert a.shape[0] == layer.rank
            np.testing.assert_allclose(scale * b @ a, layer.dense_update(), atol=1e-12 * np.abs(layer.dense_update()).max())
        else:
            assert config["lora_alpha"] == 2 and not config["rank_pattern"]
    check_truncation(case.adapter_dir, out, ["--rank", "2"] if policy else None)


def _spectra(source_path: Path) -> tuple[list[np.ndarray], list[int]]:
    source = load_adapter(source_path)
    spectra = [np.linalg.svd(_matrix(layer.dense_update()), compute_uv=False)[: layer.rank] for layer in source.layers]
    return spectra, [sum(layer.update_matrix_shape) for layer in source.layers]


def _kept(spectra: list[np.ndarray], ranks: list[int]) -> float:
    return sum(float(np.sum(s[:k] ** 2) / np.sum(s**2)) for s, k in zip(spectra, ranks))


@pytest.mark.parametrize("kind", ["llama_plain", "llama_patterns", "gpt2_conv1d"])
@pytest.mark.parametrize("share", [0.3, 0.45, 0.7])
def test_budget_bounds(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str, share: float) -> None:
    case = peft_case_factory(kind)
    spectra, costs = _spectra(case.adapter_dir)
    budget = int(share * sum(len(s) * c for s, c in zip(spectra, costs)))
    out = tmp_path / "fit"
    report = resize(case.adapter_dir, out, budget=budget, dtype="fp64")
    ranks = check_truncation(case.adapter_dir, out, None)
    order = [layer.name for layer in load_adapter(case.adapter_dir).layers]
    chosen = [ranks[name] for name in order]
    assert sum(k * c for k, c in zip(chosen, costs)) <= budget
    kept = _kept(spectra, chosen)
    assert abs(kept - report.mean_energy_kept * len(chosen)) < 1e-9
    uniform = 0.0  # the best uniform rank that fits
    for u in range(1, max(len(s) for s in spectra) + 1):
        ranks_u = [min(u, len(s)) for s in spectra]
        if sum(k * c for k, c in zip(ranks_u, costs)) <= budget:
            uniform = _kept(spectra, ranks_u)
    assert kept >= uniform - 1e-12
    steps = sorted(((float(s[k] ** 2 / np.sum(s**2)), c) for s, c in zip(spectra, costs) for k in range(1, len(s))),
                   key=lambda step: -step[0] / step[1])
    bound, left = _kept(spectra, [1] * len(spectra)), budget - sum(costs)  # every layer's first rank, then fractional greedy
    for gain, cost in steps:
        if left <= 0:
            break
        bound += min(1.0, left / cost) * gain
        left -= cost
    biggest_step = max(gain for gain, _ in steps)
    assert bound - biggest_step - 1e-12 <= kept <= bound + 1e-12


def test_budget_below_the_floors_is_refused(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli("resize", llama_plain_case.adapter_dir, "-o", tmp_path / "o", "--budget", "10")
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1 and "budget" in stderr


def test_kohya_in_kohya_out(kohya_case: KohyaCase, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    code, stdout, stderr = run_cli("resize", kohya_case.lora_file, "-o", out, "--sv-fro", "0.9", "--dtype", "fp64")
    assert code == 0, stderr
    written = load_adapter(out)
    assert written.format == "kohya"
    assert any(layer.kind == "conv" for layer in written.layers)
    check_truncation(kohya_case.lora_file, out, ["--sv-fro", "0.9"])
    metadata = written.metadata
    ranks = {layer.rank for layer in written.layers}
    assert metadata["ss_network_dim"] == (str(ranks.pop()) if len(ranks) == 1 else "Dynamic")
    assert "lora_tools.resize" in metadata


@pytest.mark.parametrize("kind", ["diffusers_current", "diffusers_legacy"])
def test_diffusers_in_diffusers_out(diffusers_case_factory: Callable[[str], object], tmp_path: Path, kind: str) -> None:
    case = diffusers_case_factory(kind)
    path = Path(case.lora_file)  # type: ignore[attr-defined]
    out = tmp_path / "small.safetensors"
    source = load_adapter(path)
    code, _, stderr = run_cli("resize", path, "-o", out, "--rank", "2", "--dtype", "fp64")
    if source.format != "diffusers":  # a legacy file reads as its own format; it is written back as that
        assert code == 0 or "names are not converted" in stderr
        return
    assert code == 0, stderr
    assert load_adapter(out).format == "diffusers"
    check_truncation(path, out, ["--rank", "2"])


def test_zero_layers_are_dropped(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    src, name = _with_one_zero_layer(llama_plain_case.adapter_dir, tmp_path)
    report = resize(src, tmp_path / "o", rank=2)
    assert report.dropped_layers == [name] and report.n_layers_out == report.n_layers_in - 1
    written = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert name in json.dumps(report.to_json()) and name not in written["target_modules"]


def test_resize_merge_verify(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    small, merged = tmp_path / "small", tmp_path / "merged"
    assert run_cli("resize", llama_plain_case.adapter_dir, "--energy", "0.9", "-o", small)[0] == 0
    code, _, stderr = run_cli("merge", llama_plain_case.base_dir, small, "-o", merged, "-q")
    assert code == 0, stderr
    code, stdout, stderr = run_cli("verify", llama_plain_case.base_dir, small, merged)
    assert code == 0, stdout + stderr


def test_table_output(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    code, stdout, _ = run_cli("resize", llama_plain_case.adapter_dir, "--rank", "2", "-o", tmp_path / "o", "--all")
    assert code == 0 and "4 → 2" in stdout and "worst layer" in stdout


@pytest.mark.parametrize(("args", "message"), [
    ([], "choose a policy"),
    (["--energy", "0.9", "--sv-fro", "0.9"], "choose one of"),
    (["--energy", "1.5"], "--energy"),
    (["--energy", "0"], "--energy"),
    (["--sv-ratio", "0.5"], "--sv-ratio"),
    (["--sv-cumulative", "nan"], "--sv-cumulative"),
    (["--rank", "0"], "--rank"),
    (["--rank", "2", "--min-rank", "3"], "--min-rank"),
    (["--min-rank", "0", "--rank", "2"], "--min-rank"),
    (["--budget", "0"], "--budget"),
    (["--rank", "2", "--format", "kohya"], "names are not converted"),
])
def test_bad_input_is_one_line_exit_2(llama_plain_case: PeftCase, tmp_path: Path, args: list[str], message: str) -> None:
    code, stdout, stderr = run_cli("resize", llama_plain_case.adapter_dir, "-o", tmp_path / "o", *args)
    assert code == 2 and stdout == "", stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "o").exists()


def test_missing_input_and_existing_out(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    code, _, stderr = run_cli("resize", tmp_path / "nope", "-o", tmp_path / "o", "--rank", "2")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "no such file" in stderr
    (tmp_path / "o").mkdir()
    code, _, stderr = run_cli("resize", llama_plain_case.adapter_dir, "-o", tmp_path / "o", "--rank", "2")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert run_cli("resize", llama_plain_case.adapter_dir, "-o", tmp_path / "o", "--rank", "2", "--force")[0] == 0


def test_kohya_semantics_of_the_dynamic_policies() -> None:
    sigma = np.array([4.0, 2.0, 1.0, 1.0])
    assert sv_ratio_rank(sigma, 2.0) == 1  # strict: σ₂ = σ₁/2 is not kept
    assert sv_ratio_rank(sigma, 4.5) == 4
    assert sv_cumulative_rank(sigma, 0.75) == 2  # (4 + 2) / 8 = 0.75 exactly
    assert sv_fro_rank(sigma, np.sqrt(20 / 22)) == 2  # σ², then the square root


def test_resize_of_safetensors_imports_no_torch(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    script = (
        "import sys; from lora_tools.cli import cli\n"
        f"cli.main(['resize', {str(llama_plain_case.adapter_dir)!r}, '--energy', '0.9', '-o', {str(tmp_path / 'o')!r},"
        " '--json'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload in float64: the oracle for the merged weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", ["fp64", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["llama_dora", "llama_plain"])
def test_base_gives_the_merged_weights_error(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path,
                                             kind: str, dtype: str) -> None:
    """--base: ‖W'_in − W'_out‖ per layer as PEFT's own merges give it, W'_out from the
    adapter as written (its fp16/bf16 rounding included; DoRA renormalises; for plain LoRA
    in fp64 it is exactly the ΔW residual)."""
    case = peft_case_factory(kind)
    out = tmp_path / "small"
    code, stdout, stderr = run_cli("resize", case.adapter_dir, "-o", out, "--energy", "0.8", "--dtype", dtype,
                                   "--base", case.base_dir, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    before, after = _peft_merged(case.base_dir, case.adapter_dir), _peft_merged(case.base_dir, out)
    errors, norms = [], []
    for layer in report["layers"]:
        key = layer["name"] + ".weight"
        error = float(torch.linalg.vector_norm(before[key] - after[key]))
        norm = float(torch.linalg.vector_norm(before[key]))
        assert layer["merged_error"] == pytest.approx(error, rel=1e-9, abs=1e-12 * norm), layer["name"]
        assert layer["merged_relative_error"] == pytest.approx(error / norm, rel=1e-9, abs=1e-12)
        if kind == "llama_plain" and dtype == "fp64":
            assert layer["merged_error"] == pytest.approx(layer["residual_fro"], rel=1e-9, abs=1e-12 * norm)
        errors.append(error)
        norms.append(norm)
    assert report["merged_relative_error"] == pytest.approx(np.linalg.norm(errors) / np.linalg.norm(norms), rel=1e-9)
    assert report["base"] == str(case.base_dir)
    assert any(e > 0 for e in errors)
    code, table, _ = run_cli("resize", case.adapter_dir, "-o", tmp_path / "again", "--energy", "0.8",
                             "--base", case.base_dir)
    assert code == 0 and "merged weights" in table and "merged" in table.split("layers,")[0]


def test_a_dora_layer_with_a_zero_update_is_kept(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path) -> None:
    """Its magnitude still rescales W0: dropping it would change the merged model."""
    llama_dora_case = peft_case_factory("llama_dora")
    src, name = _with_one_zero_layer(llama_dora_case.adapter_dir, tmp_path)
    report = resize(src, tmp_path / "o", rank=2, dtype="fp64", base=llama_dora_case.base_dir)
    assert report.dropped_layers == []
    kept = next(layer for layer in report.layers if layer.name == name)
    assert kept.rank_out == 1 and kept.merged_error == 0.0
    before, after = _peft_merged(llama_dora_case.base_dir, src), _peft_merged(llama_dora_case.base_dir, tmp_path / "o")
    torch.testing.assert_close(after[name + ".weight"], before[name + ".weight"], rtol=0, atol=0)


def test_a_base_that_does_not_fit_writes_nothing(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path) -> None:
    llama_plain_case, gpt2_conv1d_case = peft_case_factory("llama_plain"), peft_case_factory("gpt2_conv1d")
    out = tmp_path / "small"
    code, stdout, stderr = run_cli("resize", llama_plain_case.adapter_dir, "-o", out, "--rank", "2",
                                   "--base", gpt2_conv1d_case.base_dir)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()


@pytest.mark.parametrize("policy", ["energy", "sv_fro", "rank_cap"])
def test_bf16_adapter_resized_from_its_stored_bits(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path,
                                                   policy: str) -> None:
    """A bf16 adapter is read as its bit patterns and widened block by block: in float64
    output the truncation is exact (1e-9), and kept as bf16 each written factor is the
    float64 one rounded once (within one bf16 step), with σ reported as float64 gives it."""
    from lora_tools.formats.source import keep_stored
    from lora_tools.io.encode import Encoded

    case = peft_case_factory("llama_bf16")
    assert {layer.dtype for layer in load_adapter(case.adapter_dir).layers} == {"BF16"}
    # resize's reading: bits, read-only views of the mapped file, also for a file of small tensors
    held = load_adapter(case.adapter_dir, place=keep_stored).layers
    assert all(isinstance(f, Encoded) and not f.bits.flags.writeable for layer in held for f in (layer.a, layer.b))
    exact, narrow = tmp_path / "fp64", tmp_path / "bf16"
    code, _, stderr = run_cli("resize", case.adapter_dir, "-o", exact, *POLICIES[policy], "--dtype", "fp64")
    assert code == 0, stderr
    ranks = check_truncation(case.adapter_dir, exact, POLICIES[policy])
    code, stdout, stderr = run_cli("resize", case.adapter_dir, "-o", narrow, *POLICIES[policy], "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["dtype"] == "BF16"
    wide, kept = load_adapter(exact), load_adapter(narrow)
    for layer in load_adapter(case.adapter_dir).layers:
        sigma = np.linalg.svd(_matrix(layer.dense_update()), compute_uv=False)
        reported = next(r for r in report["layers"] if r["name"] == layer.name)
        assert reported["rank_out"] == ranks[layer.name]
        np.testing.assert_allclose(reported["singular_values"], sigma[: layer.rank], rtol=0, atol=1e-9 * sigma[0])
        got, want = kept.layer(layer.name), wide.layer(layer.name)
        assert got.dtype == "BF16" and got.rank == want.rank
        for ours, reference in ((got.a, want.a), (got.b, want.b)):
            reference = np.asarray(reference, dtype=np.float64)
            step = np.spacing(np.abs(reference).astype(np.float32)) * 2.0**16  # a bf16 step at each value
            assert np.all(np.abs(np.asarray(ours, dtype=np.float64) - reference) <= step), layer.name


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warning would be a second stderr line
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_factors_that_overflow_the_output_dtype_leave_nothing(llama_plain_case: PeftCase, tmp_path: Path,
                                                              dtype: str, with_base: bool) -> None:
    """Factors are formed on worker threads while the file is written (or, with --base,
    read for the merged figures first): one that does not fit the output dtype stops the
    run with one line naming the layer, exit 2, no OUT and no temporary."""
    import shutil

    from safetensors.numpy import save_file

    src = tmp_path / "huge"
    shutil.copytree(llama_plain_case.adapter_dir, src)
    tensors = load_file(src / "adapter_model.safetensors")
    victim = sorted(k for k in tensors if k.endswith("lora_B.weight"))[-1]  # the last written
    if dtype == "fp16":
        tensors[victim] = (tensors[victim] * 1e12).astype(np.float32)
    else:  # balanced factors are √σ-sized: past 3.4e38 only from factors near float32's largest
        for key in (victim, victim.replace("lora_B", "lora_A")):
            tensors[key] = (np.sign(tensors[key]) * 3e38).astype(np.float32)
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    base = ["--base", llama_plain_case.base_dir] if with_base else []
    code, _, stderr = run_cli("resize", src, "-o", out, "--rank", "2", "--dtype", dtype, *base)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "overflow" in stderr, stderr
    module = victim.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert module in stderr, stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["huge"]