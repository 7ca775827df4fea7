"""LyCORIS files made by lycoris-lora itself (tests/lycoris_builders.py: LoHa, LoKr factored,
full and Tucker, LoCon-Tucker, full diffs, DoRA on either axis, a bf16 file) on a tiny
model with Linear, 1×1 and 3×3 convs. The truth is what the trained network computes
(its forward pass, float64); lora-tools' merge must equal it (fp32: 1e-6 of the update's
largest value; bf16 files within the fp32 output's rounding of the float64 truth), verify
must prove the merge, inspect's σ must be the dense float64 SVD's (1e-9·σ₁), and bad files
are one line, exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from lycoris_builders import LYCORIS_CASE_KINDS, LycorisCase
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from lora_tools.formats import load_adapter
from lora_tools.formats.names import resolve_names
from lora_tools.inspect import inspect_adapter
from lora_tools.io.checkpoint import BaseCheckpoint

pytest.importorskip("lycoris")

ALGO = {"loha": "loha", "loha_tucker": "loha", "lokr_factored": "lokr", "lokr_full": "lokr", "lokr_tucker": "lokr",
        "locon_tucker": "locon", "full": "full", "locon_dora_out": "lora", "locon_dora_in": "lora", "loha_bf16": "loha"}


@pytest.mark.parametrize("kind", LYCORIS_CASE_KINDS)
def test_merge_equals_the_trained_network(lycoris_case_factory: Callable[[str], LycorisCase], tmp_path: Path,
                                          kind: str) -> None:
    case = lycoris_case_factory(kind)
    merged = tmp_path / "merged.safetensors"
    code, _, stderr = run_cli("merge", case.base_file, case.lora_file, "-o", merged, "-q")
    assert code == 0, stderr
    got = load_file(merged)
    for module in case.modules.values():
        weight = got[f"{module.module}.weight"].double().numpy()
        largest = float(np.abs(module.delta).max())
        # fp32 output: its own rounding of W′ (≤ ½ ulp of |W′|) plus 1e-6 of the update
        tolerance = 1e-6 * largest + float(np.abs(module.merged).max()) * 2.0**-24
        np.testing.assert_allclose(weight, module.merged, rtol=0, atol=tolerance, err_msg=module.module)
        if module.bias_delta is not None:
            bias = got[f"{module.module}.bias"].double().numpy()
            base = load_file(case.base_file)[f"{module.module}.bias"].double().numpy()
            np.testing.assert_allclose(bias - base, module.bias_delta, rtol=0, atol=1e-6 * np.abs(module.bias_delta).max())
    code, stdout, stderr = run_cli("verify", case.base_file, case.lora_file, merged)
    assert code == 0, stdout + stderr


@pytest.mark.parametrize("kind", [k for k in LYCORIS_CASE_KINDS if "dora" not in k])
def test_inspect_sigma_is_the_dense_svd(lycoris_case_factory: Callable[[str], LycorisCase], kind: str) -> None:
    case = lycoris_case_factory(kind)
    report = inspect_adapter(case.lora_file, base_path=case.base_file)
    by_name = {layer.name: layer for layer in report.layers}
    for module in case.modules.values():
        figures = by_name[module.module]
        assert figures.algo == ("lora" if kind == "locon_tucker" and not module.tucker else ALGO[kind])
        sigma = np.linalg.svd(module.delta.reshape(module.delta.shape[0], -1), compute_uv=False)
        ours = np.asarray(figures.singular_values)
        k = min(len(ours), len(sigma))
        np.testing.assert_allclose(ours[:k], sigma[:k], rtol=0, atol=1e-9 * sigma[0], err_msg=module.module)
        assert np.all(ours[k:] <= 1e-9 * sigma[0])
        assert figures.fro_norm == pytest.approx(float(np.linalg.norm(module.delta)), rel=1e-9)


@pytest.mark.parametrize("out_dim", [4, 40])
def test_inspect_sigma_of_a_tucker_conv_loha_on_either_route(tmp_path: Path, out_dim: int) -> None:
    """A 3×3 Tucker LoHa conv keyed as LyCORIS stores it (hada_w*_a (r, out), hada_w*_b (r, in),
    hada_t* (r, r, 3, 3)), r₁ = 3 ≠ r₂ = 2: with out = 4 < r₁r₂ B's Gram is singular and inspect
    forms B in the conv layer's shape (Householder); with out = 40 σ come from the r×r pair
    Grams alone. Either way they are the dense float64 SVD of LyCORIS' ΔW = s·W₁∘W₂ with
    W[o, i, k] = Σ_ab t[a,b,k]·w_a[a,o]·w_b[b,i] (functional/loha.py), s = alpha / r₁."""
    rng = np.random.default_rng(out_dim)
    g = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    tensors = {"lycoris_conv.alpha": np.asarray(1.5, dtype=np.float32)}
    sides = []
    for n, r in ((1, 3), (2, 2)):
        t, wa, wb = g(r, r, 3, 3), g(r, out_dim), g(r, 5)
        tensors |= {f"lycoris_conv.hada_t{n}": t, f"lycoris_conv.hada_w{n}_a": wa, f"lycoris_conv.hada_w{n}_b": wb}
        sides.append(np.einsum("abhw,ao,bi->oihw", *(x.astype(np.float64) for x in (t, wa, wb))))
    path = tmp_path / "loha_conv.safetensors"
    save_numpy(tensors, path)
    delta = (1.5 / 3) * sides[0] * sides[1]
    sigma = np.linalg.svd(delta.reshape(out_dim, -1), compute_uv=False)
    (figures,) = inspect_adapter(path).layers
    assert (figures.algo, figures.kind, figures.shape, figures.rank) == ("loha", "conv", [out_dim, 5, 3, 3], 6)
    ours = np.asarray(figures.singular_values)
    k = min(len(ours), len(sigma))
    np.testing.assert_allclose(ours[:k], sigma[:k], rtol=0, atol=1e-9 * sigma[0])
    assert np.all(ours[k:] <= 1e-9 * sigma[0])


def test_lokr_with_both_sides_full_ignores_alpha(lycoris_case_factory: Callable[[str], LycorisCase]) -> None:
    case = lycoris_case_factory("lokr_full")
    adapter = load_adapter(case.lora_file)
    assert all(layer.scale == 1.0 for layer in adapter.layers)
    stored = load_numpy(case.lora_file)
    assert any(float(v) != 1.0 for k, v in stored.items() if k.endswith(".alpha"))  # the file has alphas: ignored


@pytest.mark.parametrize("kind", ["loha", "lokr_factored", "locon_tucker", "full"])
def test_convert_to_plain_lora_is_exact(lycoris_case_factory: Callable[[str], LycorisCase], tmp_path: Path,
                                        kind: str) -> None:
    """LoHa/LoKr/Tucker/full as the LoRA factors they are exactly (float64: products of float32),
    read back and proven, and merging that LoRA gives the trained network's weights."""
    case = lycoris_case_factory(kind)
    out = tmp_path / "lora"
    # a full diff's diff_b is a LoRA bias: PEFT holds it (lora_bias), kohya does not
    target = ["--to", "peft", "--base", case.base_file] if kind == "full" else ["--to", "kohya"]
    code, stdout, stderr = run_cli("convert", case.lora_file, *target, "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["exact"] and report["dtype"] in ("F64", "F32")
    written = load_adapter(out)
    assert {layer.algo for layer in written.layers} == {"lora"}
    merged = tmp_path / "merged.safetensors"
    assert run_cli("merge", case.base_file, out, "-o", merged, "-q")[0] == 0
    got = load_file(merged)
    for module in case.modules.values():
        tolerance = 1e-6 * float(np.abs(module.delta).max()) + float(np.abs(module.merged).max()) * 2.0**-24
        np.testing.assert_allclose(got[f"{module.module}.weight"].double().numpy(), module.merged, rtol=0, atol=tolerance)


def test_resize_of_a_loha_file_truncates_its_exact_form(lycoris_case_factory: Callable[[str], LycorisCase],
                                                        tmp_path: Path) -> None:
    case = lycoris_case_factory("loha")
    out = tmp_path / "small.safetensors"
    code, stdout, stderr = run_cli("resize", case.lora_file, "--rank", "2", "--dtype", "fp64", "-o", out, "--json")
    assert code == 0, stderr
    report = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
    with BaseCheckpoint.open(case.base_file) as base:
        written = resolve_names(load_adapter(out), base.module_paths(), str(case.base_file))
        names = resolve_names(load_adapter(case.lora_file), base.module_paths(), str(case.base_file))
    for source, layer in zip(names.layers, written.layers):
        delta = case.modules[source.name].delta
        matrix = delta.reshape(delta.shape[0], -1)
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vt[:2]
        got = layer.dense_update().reshape(matrix.shape)
        np.testing.assert_allclose(got, best, rtol=0, atol=1e-9 * s[0])
        entry = next(r for r in report.values() if r["rank_out"] == layer.rank and r["name"].endswith(source.name.replace(".", "_")))
        assert entry["residual_fro"] == pytest.approx(float(np.sqrt(np.sum(s[2:] ** 2))), rel=1e-9)


@pytest.mark.parametrize(("case_kind", "edit", "message"), [
    ("loha", lambda t: t.pop(next(k for k in sorted(t) if k.endswith("hada_w2_b"))), "hada_w2_b"),
    ("loha_tucker", lambda t: t.update({k: t[k][:2] for k in t if k.endswith("hada_t1")}), "Tucker core"),
    ("locon_tucker", lambda t: t.update({k: t[k][:, :2] for k in t if k.endswith("lora_mid.weight")}), "lora_mid"),
    ("lokr_factored", lambda t: t.update({k: t[k][:, :1] for k in t if k.endswith("lokr_w1_b")}), "does not fit"),
])
def test_broken_files_are_one_line_exit_2(lycoris_case_factory: Callable[[str], LycorisCase], tmp_path: Path,
                                          case_kind: str, edit: Callable[[dict[str, np.ndarray]], object],
                                          message: str) -> None:
    case = lycoris_case_factory(case_kind)
    tensors = {k: v for k, v in load_numpy(case.lora_file).items()} if case_kind != "loha_bf16" else {}
    edit(tensors)
    broken = tmp_path / "broken.safetensors"
    save_numpy(tensors, broken)
    out = tmp_path / "merged.safetensors"
    code, _, stderr = run_cli("merge", case.base_file, broken, "-o", out, "-q")
    assert code == 2 and message in stderr and str(broken) in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_blend_takes_lycoris_inputs_through_their_exact_form(lycoris_case_factory: Callable[[str], LycorisCase],
                                                             tmp_path: Path) -> None:
    """cat of a LoHa and a LoKr file (1×1 convs flattened in one, 4-D in the other) is
    exactly 0.6·ΔW_LoHa + 0.4·ΔW_LoKr per module."""
    loha, lokr = lycoris_case_factory("loha"), lycoris_case_factory("lokr_factored")
    out = tmp_path / "blend.safetensors"
    code, _, stderr = run_cli("blend", loha.lora_file, lokr.lora_file, "--weight", "0.6", "--weight", "0.4",
                              "--method", "cat", "-o", out)
    assert code == 0, stderr
    with BaseCheckpoint.open(loha.base_file) as base:
        blended = resolve_names(load_adapter(out), base.module_paths(), str(loha.base_file))
    for layer in blended.layers:
        expected = 0.6 * loha.modules[layer.name].delta + 0.4 * lokr.modules[layer.name].delta
        got = layer.dense_update().reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max(), err_msg=layer.name)
