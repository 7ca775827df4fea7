"""verify (issue #4): accepts correct merges (ours and PEFT's own), and catches, in fp32
and in bf16, every classic way a merge goes wrong, naming the tensor and what is wrong.

Broken checkpoints are written here, independently of lora_tools: W0 + k·ΔW computed in
float64 from the raw base and adapter tensors, rounded to the stored dtype, saved with
safetensors into a copy of the base folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blas_rows import gemm_rows_invariant
from builders import PEFT_CASE_KINDS, DiffusersCase, KohyaCase, PeftCase
from cli_run import run_cli

PEFT_PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
UNADAPTED = "lm_head.weight"




def verify_json(*args: object) -> tuple[int, dict]:
    """Exit code and the one JSON document `verify --json` prints."""
    code, out, err = run_cli("verify", *args, "--json")
    assert code in (0, 1), err
    return code, json.loads(out)  # the whole of stdout is one document


def lora_factors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(B, A, s) per base weight key of a PEFT LoRA folder without DoRA or patterns;
    s = alpha/r, or alpha/√r under rsLoRA."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not (config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern")
                or config.get("fan_in_fan_out"))
    raw = load_file(adapter_dir / "adapter_model.safetensors")
    factors = {}
    for key, a in raw.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            rank = a.shape[0]
            scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
            factors[module + ".weight"] = (raw[key.replace(".lora_A.", ".lora_B.")], a, scale)
    return factors


def plain_lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A in float64 per base weight key."""
    return {k: s * (b.double() @ a.double()) for k, (b, a, s) in lora_factors(adapter_dir).items()}


def write_checkpoint(base_dir: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the base folder whose weights are `tensors`."""
    shutil.copytree(base_dir, out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- accepting

@pytest.fixture(scope="session")
def our_merge(tmp_path_factory: pytest.TempPathFactory,
              peft_case_factory: Callable[[str], PeftCase]) -> Callable[[str], Path]:
    root = tmp_path_factory.mktemp("verify-ours")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            case = peft_case_factory(kind)
            code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, "-o", root / kind, "--quiet")
            assert code == 0, err
            done[kind] = root / kind
        return done[kind]

    return get


def test_verify_accepts_our_merge(peft_case: PeftCase, our_merge: Callable[[str], Path]) -> None:
    code, report = verify_json(peft_case.base_dir, peft_case.adapter_dir, our_merge(peft_case.name))
    assert code == 0, [t for t in report["tensors"] if t["verdict"] != "ok"]
    assert report["equivalent"] is True
    assert report["n_failed"] == 0 and report["n_inconclusive"] == 0
    assert report["n_unadapted_identical"] == report["n_unadapted"] > 0
    assert {t["verdict"] for t in report["tensors"]} == {"ok"}
    if not torch.cuda.is_available():  # merged on the CPU: replayed bit for bit (fp32 round-once)
        assert all(t["recipe"] for t in report["tensors"])


@pytest.mark.parametrize(
    ("kind", "autocast"),
    [(kind, True) for kind in PEFT_CASE_KINDS] + [("llama_bf16", False)],
    ids=[*PEFT_CASE_KINDS, "llama_bf16-native-factors"],
)
def test_verify_accepts_peft_own_merge(
    kind: str, autocast: bool, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    """PEFT's merge_and_unload, saved with save_pretrained, verifies as equivalent.

    By default PEFT merges bf16 factors as fp32 (autocast); with autocast off it rounds
    ΔW to bf16 and adds in bf16, which verify must recognise as a correct recipe too.
    """
    case = peft_case_factory(kind)
    merged = case.peft_model(autocast_adapter_dtype=autocast).merge_and_unload()
    merged.save_pretrained(tmp_path / "peft-merged")
    code, report = verify_json(case.base_dir, case.adapter_dir, tmp_path / "peft-merged")
    assert code == 0, [t for t in report["tensors"] if t["verdict"] != "ok"]
    assert {t["verdict"] for t in report["tensors"]} == {"ok"}
    assert not report["changed_unadapted"] and not report["layout_problems"]


def test_verify_accepts_a_correct_fp32_merge_made_another_way(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    """Not every correct fp32 merge rounds like ours: here B·A is exact before it is
    rounded (as a fused GPU kernel may do) and scaled by s rounded to fp32. With rsLoRA
    s = 16/√8 is no fp32 number, which moves the fitted strength k by ~1.7e-8: far above
    the rounding noise of k in fp32 (~5e-9), far below anything wrong. No recipe replays
    it, so only the tolerances decide: a GPU merge of this adapter looks just like it."""
    case = peft_case_factory("llama_rslora")
    base = load_file(case.base_dir / "model.safetensors")
    factors = lora_factors(case.adapter_dir)
    tensors = dict(base)
    for name, (b, a, scale) in factors.items():
        product = (b.double() @ a.double()).float()  # exact, rounded once
        tensors[name] = base[name] + product * torch.tensor(scale, dtype=torch.float32)
    merged = write_checkpoint(case.base_dir, tmp_path / "merged", tensors)
    code, report = verify_json(case.base_dir, case.adapter_dir, merged)
    assert code == 0, [(t["name"], t["verdict"], t["detail"]) for t in report["tensors"] if t["verdict"] != "ok"]
    assert all(t["recipe"] is None for t in report["tensors"])
    assert max(abs(t["strength"] - 1) for t in report["tensors"]) > 6 * max(t["strength_spread"] for t in report["tensors"])


def _bf16_gpu_style_merge(case: PeftCase, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter with alpha 7 (s = 1.75, so that the second rounding bites) and the
    tensors of PEFT's bf16 merge on a GPU: the bf16 GEMM accumulates in fp32 and rounds
    once, then each bf16 operation (the scaling, the add) rounds its result."""
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 7}))
    base = load_file(case.base_dir / "model.safetensors")
    tensors = dict(base)
    for name, (b, a, scale) in lora_factors(adapter).items():
        tensors[name] = base[name] + (b.float() @ a.float()).to(torch.bfloat16) * scale
        assert tensors[name].dtype == torch.bfloat16
    return adapter, tensors


def test_verify_accepts_peft_native_bf16_merge_as_a_gpu_computes_it(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    """PEFT with bf16 factors (autocast off) on a GPU: the bf16 GEMM rounds B·A, the
    scaling rounds it again, then the add rounds. On the CPU PEFT upcasts instead, so
    this is written here by hand, with alpha 7 (s = 1.75) so that the second rounding
    bites. Up to 1.5 bf16 ulp from the truth: verify must know the recipe."""
    case = peft_case_factory("llama_bf16")
    adapter, tensors = _bf16_gpu_style_merge(case, tmp_path)
    merged = write_checkpoint(case.base_dir, tmp_path / "merged", tensors)
    code, report = verify_json(case.base_dir, adapter, merged)
    assert code == 0, [(t["name"], t["verdict"], t["detail"]) for t in report["tensors"] if t["verdict"] != "ok"]
    assert {t["recipe"] for t in report["tensors"]} == {"PEFT on a GPU: B·A and its scaling rounded to bfloat16, added in bfloat16"}
    assert max(t["worst_ulps"] for t in report["tensors"]) > 1  # the plain tolerance alone would refuse it


def test_verify_accepts_weighted_merge_and_needs_the_weights(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    plain, rslora = peft_case_factory("llama_plain"), peft_case_factory("llama_rslora")
    out = tmp_path / "merged"
    weights = ("--weight", 0.7, "--weight", -0.3)
    code, _, err = run_cli("merge", plain.base_dir, plain.adapter_dir, rslora.adapter_dir, *weights, "-o", out, "-q")
    assert code == 0, err
    code, report = verify_json(plain.base_dir, plain.adapter_dir, rslora.adapter_dir, out, *weights)
    assert code == 0 and report["weights"] == [0.7, -0.3]
    # Verified as weights 1, 1: where only the plain adapter acts, 0.7·ΔW is a wrong
    # strength; where both act, the change is no multiple of ΔW₁ + ΔW₂: a mismatch.
    code, report = verify_json(plain.base_dir, plain.adapter_dir, rslora.adapter_dir, out)
    assert code == 1
    both = {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    for check in report["tensors"]:
        if check["name"] in both:
            assert check["verdict"] == "mismatch", check
        else:
            assert check["verdict"] == "wrong strength" and check["strength"] == pytest.approx(0.7), check


def test_verify_accepts_kohya_and_diffusers_merges(
    kohya_case: KohyaCase, diffusers_case: DiffusersCase, tmp_path: Path
) -> None:
    for name, base, lora in [("kohya", kohya_case.base_file, kohya_case.lora_file),
                             (diffusers_case.name, diffusers_case.base_file, diffusers_case.lora_file)]:
        out = tmp_path / f"{name}.safetensors"
        code, _, err = run_cli("merge", base, lora, "-o", out, "-q")
        assert code == 0, err
        code, report = verify_json(base, lora, out)
        assert code == 0, (name, [t for t in report["tensors"] if t["verdict"] != "ok"])


def test_verify_accepts_a_dtype_converted_merge(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """merge --dtype bf16 --verify: the unadapted tensors are the base rounded to bf16."""
    out = tmp_path / "merged"
    code, stdout, err = run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out,
                                "--dtype", "bf16", "--verify", "-q")
    assert code == 0, stdout + err
    code, report = verify_json(llama_plain_case.base_dir, llama_plain_case.adapter_dir, out)
    assert code == 0
    assert {t["dtype"] for t in report["tensors"]} == {"bfloat16"}


# --------------------------------------------------------------------------- catching

@dataclass(frozen=True)
class Setting:
    """A base, a plain LoRA on it, its ΔW, and where broken checkpoints go."""

    case: PeftCase
    base: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    root: Path

    def merged(self, strength: float = 1.0, **strengths: float) -> dict[str, torch.Tensor]:
        """W0 + k·ΔW for every adapted tensor, computed in float64 and rounded once."""
        out = {}
        for name, w0 in self.base.items():
            if name in self.deltas:
                out[name] = (w0.double() + strength * self.deltas[name]).to(w0.dtype)
            else:
                out[name] = w0.clone()
        return out


@pytest.fixture(scope="module", params=["llama_plain", "llama_bf16"], ids=["fp32", "bf16"])
def setting(request: pytest.FixtureRequest, peft_case_factory: Callable[[str], PeftCase],
            tmp_path_factory: pytest.TempPathFactory) -> Setting:
    case = peft_case_factory(request.param)
    base = load_file(case.base_dir / "model.safetensors")
    return Setting(case, base, plain_lora_deltas(case.adapter_dir), tmp_path_factory.mktemp(f"broken-{case.name}"))


def _not_applied(s: Setting) -> dict[str, torch.Tensor]:
    return s.merged(0.0)


def _swapped(s: Setting) -> dict[str, torch.Tensor]:
    tensors = s.merged()
    tensors[Q0] = (s.base[Q0].double() + s.deltas[Q1]).to(s.base[Q0].dtype)
    tensors[Q1] = (s.base[Q1].double() + s.deltas[Q0]).to(s.base[Q1].dtype)
    return tensors


def _bumped(name: str) -> Callable[[Setting], dict[str, torch.Tensor]]:
    def build(s: Setting) -> dict[str, torch.Tensor]:
        tensors = s.merged()
        w = tensors[name].double()
        w[3, 5] += 1e-2 * float(s.base[name].abs().max())
        tensors[name] = w.to(s.base[name].dtype)
        return tensors

    return build


ALL = "every adapted tensor"
# name -> (builder, tensors that must fail, their verdict, the strength k they must show)
CORRUPTIONS: dict[str, tuple[Callable[[Setting], dict[str, torch.Tensor]], str | list[str], str, float | None]] = {
    "not_applied": (_not_applied, ALL, "not applied", 0.0),
    "half": (lambda s: s.merged(0.5), ALL, "wrong strength", 0.5),
    "double": (lambda s: s.merged(2.0), ALL, "wrong strength", 2.0),
    "sign_flipped": (lambda s: s.merged(-1.0), ALL, "wrong strength", -1.0),
    "five_percent_strong": (lambda s: s.merged(1.05), ALL, "wrong strength", 1.05),
    "layers_swapped": (_swapped, [Q0, Q1], "mismatch", None),
    "adapted_element_moved": (_bumped(Q0), [Q0], "mismatch", 1.0),
    "unadapted_element_moved": (_bumped(UNADAPTED), [], "", None),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_verify_catches(corruption: str, setting: Setting, record_property: Callable[[str, object], None]) -> None:
    build, failing, verdict, strength = CORRUPTIONS[corruption]
    merged = write_checkpoint(setting.case.base_dir, setting.root / corruption, build(setting))
    code, report = verify_json(setting.case.base_dir, setting.case.adapter_dir, merged)
    assert code == 1
    assert report["equivalent"] is False

    expected_failing = sorted(setting.deltas) if failing == ALL else sorted(failing)
    bad = {t["name"]: t for t in report["tensors"] if t["verdict"] != "ok"}
    assert sorted(bad) == expected_failing, {n: (t["verdict"], t["detail"]) for n, t in bad.items()}
    assert report["n_adapted"] == len(setting.deltas)
    ks = {}
    for name, check in bad.items():
        assert check["verdict"] == verdict, (name, check["verdict"], check["detail"])
        assert check["max_abs_error"] > 0
        ks[name] = check["strength"]
        if strength is not None:
            # The fitted strength: exact up to rounding (bf16: ~1e-4).
            assert check["strength"] == pytest.approx(strength, abs=2e-3), name
    if corruption == "layers_swapped":  # the update of another layer: k far from 1 (about 0)
        assert all(abs(k) < 0.2 for k in ks.values()), ks
    if corruption == "adapted_element_moved":
        moved = 1e-2 * float(setting.base[Q0].abs().max())
        assert 0.5 * moved <= bad[Q0]["max_abs_error"] <= 1.5 * moved  # moved, then rounded (bf16)
        assert "[3, 5]" in bad[Q0]["detail"]
    if corruption == "unadapted_element_moved":
        assert report["changed_unadapted"] == [UNADAPTED]
    else:
        assert report["changed_unadapted"] == []
    record_property("strengths", ks)
    print(f"{setting.case.name} {corruption}: k = " + ", ".join(f"{n}: {k:.6g}" for n, k in sorted(ks.items())))

    # The human report names the culprit too, and says what is wrong with it.
    code, stdout, _ = run_cli("verify", setting.case.base_dir, setting.case.adapter_dir, merged)
    assert code == 1
    culprit = (expected_failing or [UNADAPTED])[0]
    assert culprit in stdout
    assert (verdict or "changed") in stdout
    assert "NOT EQUIVALENT" in stdout


def test_update_below_bf16_resolution_is_inconclusive(
    llama_bf16_base_dir: Path, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    """B scaled by 1e-6: no bf16 weight can show the update, so neither a correct merge
    nor no merge at all can be told apart from a 5 % error: never "ok"."""
    case = peft_case_factory("llama_bf16")
    tiny = tmp_path / "tiny-adapter"
    tiny.mkdir()
    shutil.copy(case.adapter_dir / "adapter_config.json", tiny)
    factors = load_file(case.adapter_file)
    save_file({k: (v.double() * 1e-6).to(v.dtype) if ".lora_B." in k else v for k, v in factors.items()},
              tiny / "adapter_model.safetensors")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", llama_bf16_base_dir, tiny, "-o", out, "-q")
    assert code == 0, err
    code, report = verify_json(llama_bf16_base_dir, tiny, out)
    assert {t["verdict"] for t in report["tensors"]} == {"inconclusive"}
    assert report["n_inconclusive"] == report["n_adapted"] == 14
    assert all(t["strength_spread"] > 0.1 for t in report["tensors"])
    code, stdout, _ = run_cli("verify", llama_bf16_base_dir, tiny, out)
    assert "inconclusive" in stdout
    # An inconclusive tensor is not a failed one (exit 0), but is never counted as ok.
    assert code == 0
    assert "0/14 adapted tensors ok" in stdout and "14 inconclusive" in stdout


def test_verify_json_is_one_document_with_per_tensor_figures(
    llama_plain_case: PeftCase, our_merge: Callable[[str], Path]
) -> None:
    code, out, err = run_cli("verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir,
                             our_merge("llama_plain"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert out.strip().startswith("{") and out.strip().endswith("}")
    for key in ("base", "merged", "adapters", "weights", "equivalent", "n_adapted", "n_unadapted",
                "n_unadapted_identical", "n_failed", "n_inconclusive", "tensors", "changed_unadapted"):
        assert key in report, key
    assert report["n_adapted"] == len(report["tensors"]) == 14
    for check in report["tensors"]:
        for key in ("name", "verdict", "dtype", "max_abs_error", "max_rel_error", "worst_ulps", "strength",
                    "strength_spread", "forward_rel_error"):
            assert key in check, key
        assert check["dtype"] == "float32"
        assert 0 <= check["max_abs_error"] < 1e-6
        assert check["strength"] == pytest.approx(1.0, abs=1e-6)

    # max_abs_error is |stored − (W0 + ΔW)|, computed here from the files.
    deltas = plain_lora_deltas(llama_plain_case.adapter_dir)
    base = load_file(llama_plain_case.base_dir / "model.safetensors")
    merged = load_file(our_merge("llama_plain") / "model.safetensors")
    q0 = next(t for t in report["tensors"] if t["name"] == Q0)
    error = float((merged[Q0].double() - (base[Q0].double() + deltas[Q0])).abs().max())
    assert q0["max_abs_error"] == pytest.approx(error, rel=1e-6)


# --------------------------------------------------------------------------- row blocks
# verify checks plain LoRA tensors by row blocks (verify_math / verify_blocks) and
# everything else with the whole-tensor check. The test models are so small that a
# tensor is one block at the real block size: here blocks are made a few rows high, so
# every tensor spans many blocks (and a 1-row tail is folded into the last block), and
# both paths must reach the same verdicts, recipes, details and figures.

SMALL_BLOCK = 200  # elements: blocks of the fewest rows there are (dense.MIN_BLOCK_ROWS, 16): 64 rows = 4 blocks


def _both_paths(monkeypatch: pytest.MonkeyPatch, *args: object, **kwargs: object) -> tuple[object, object, int]:
    """(report by row blocks, report by the whole-tensor check, tensors the blocks judged)."""
    from lora_tools.verify import operation as verify_module
    from lora_tools.verify import block_math as verify_math

    judged = []
    real = verify_module.check_plain_tensor

    def counting(*a: object, **k: object) -> object:
        result = real(*a, screen=False, **k)  # the exact blocks (the float32 screen: test_verify_screen.py)
        judged.append(result is not None)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(verify_math, "BLOCK_ELEMENTS", SMALL_BLOCK)
        patch.setattr(verify_module, "check_plain_tensor", counting)
        blocked = verify_module.verify(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(verify_module, "check_plain_tensor", lambda *a, **k: None)
        whole = verify_module.verify(*args, **kwargs)
    return blocked, whole, sum(judged)


def _assert_same_reports(blocked: object, whole: object) -> None:
    assert blocked.equivalent == whole.equivalent
    assert [t.name for t in blocked.tensors] == [t.name for t in whole.tensors]
    for b, w in zip(blocked.tensors, whole.tensors):
        assert (b.verdict, b.dtype) == (w.verdict, w.dtype), (b, w)
        if gemm_rows_invariant() or not (b.recipe is None and w.recipe is not None and w.recipe.startswith("fp32")):
            assert b.recipe == w.recipe, (b, w)  # else: this BLAS's block GEMMs cannot replay a whole-tensor fp32 merge
        for figure in ("max_abs_error", "max_rel_error", "worst_ulps", "strength", "strength_spread", "forward_rel_error"):
            got, want = getattr(b, figure), getattr(w, figure)
            assert (got is None) == (want is None), (b.name, figure, got, want)
            if want is not None:
                # float64 sums of other GEMM shapes: the strength figures 1e-9 apart (or ~1e-8 where the
                # BLAS rounds by row count); the error figures are differences of values ~1 that lie ~1e-7
                # apart, so the float64 rounding of either side (1e-16) is already 1e-9 of them
                exact = gemm_rows_invariant() and figure in ("strength", "strength_spread")
                assert got == pytest.approx(want, rel=1e-9 if exact else 1e-6, abs=1e-300), (b.name, figure)
        if b.verdict != "ok":  # the details quote figures to 3-6 digits: identical
            assert b.detail == w.detail, (b, w)


@pytest.mark.parametrize("corruption", ["healthy", *CORRUPTIONS])
def test_row_blocks_agree_with_the_whole_tensor_check(
    corruption: str, setting: Setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = (lambda s: s.merged()) if corruption == "healthy" else CORRUPTIONS[corruption][0]
    merged = write_checkpoint(setting.case.base_dir, setting.root / f"blocks-{corruption}", build(setting))
    blocked, whole, judged = _both_paths(monkeypatch, setting.case.base_dir, [setting.case.adapter_dir], merged)
    assert judged == len(setting.deltas)  # every tensor of a plain LoRA went by row blocks
    _assert_same_reports(blocked, whole)
    if corruption != "healthy":
        assert not blocked.equivalent


def test_row_blocks_agree_with_explicit_tolerances(setting: Setting, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, strength in [("tol-healthy", 1.0), ("tol-half", 0.5)]:
        merged = write_checkpoint(setting.case.base_dir, setting.root / name, setting.merged(strength))
        for atol, rtol in [(1e-6, None), (None, 1e-2), (0.0, 0.0)]:
            blocked, whole, judged = _both_paths(
                monkeypatch, setting.case.base_dir, [setting.case.adapter_dir], merged, atol=atol, rtol=rtol
            )
            assert judged == len(setting.deltas)
            _assert_same_reports(blocked, whole)


def test_row_blocks_agree_on_gpu_recipe_weights_and_dtype_conversion(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PEFT replays (a bf16 GPU merge), two adapters with weights that are no power
    of two (merge's unfused replay), and an fp32 base stored as bf16."""
    bf16 = peft_case_factory("llama_bf16")
    adapter, tensors = _bf16_gpu_style_merge(bf16, tmp_path)
    gpu = write_checkpoint(bf16.base_dir, tmp_path / "gpu", tensors)
    blocked, whole, judged = _both_paths(monkeypatch, bf16.base_dir, [adapter], gpu)
    assert judged > 0 and {t.recipe for t in blocked.tensors} == {  # bf16 recipes: rounded far above GEMM bits
        "PEFT on a GPU: B·A and its scaling rounded to bfloat16, added in bfloat16"}
    _assert_same_reports(blocked, whole)

    plain, rslora = peft_case_factory("llama_plain"), peft_case_factory("llama_rslora")
    weighted = tmp_path / "weighted"
    code, _, err = run_cli("merge", plain.base_dir, plain.adapter_dir, rslora.adapter_dir,
                           "--weight", 0.7, "--weight", -0.3, "-o", weighted, "-q")
    assert code == 0, err
    adapters = [plain.adapter_dir, rslora.adapter_dir]
    for weights in ([0.7, -0.3], None):  # right weights: ok and replayed; none given: failures
        blocked, whole, judged = _both_paths(monkeypatch, plain.base_dir, adapters, weighted, weights=weights)
        assert judged == len(blocked.tensors) > 0
        _assert_same_reports(blocked, whole)
        assert blocked.equivalent is (weights is not None)
    if gemm_rows_invariant():  # else block fp32 GEMMs cannot replay the whole-tensor merge (tests/blas_rows.py)
        assert all(t.recipe for t in _both_paths(monkeypatch, plain.base_dir, adapters, weighted, weights=[0.7, -0.3])[0].tensors)

    converted = tmp_path / "converted"
    code, _, err = run_cli("merge", plain.base_dir, plain.adapter_dir, "-o", converted, "--dtype", "bf16", "-q")
    assert code == 0, err
    blocked, whole, judged = _both_paths(monkeypatch, plain.base_dir, [plain.adapter_dir], converted)
    assert judged == len(blocked.tensors) > 0 and blocked.equivalent
    _assert_same_reports(blocked, whole)


def test_row_blocks_leave_other_layers_to_the_whole_tensor_check(
    peft_case: PeftCase, our_merge: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DoRA, embeddings, fan_in_fan_out, biases and modules_to_save go the whole-tensor
    way; whatever went by blocks agrees with it."""
    blocked, whole, _ = _both_paths(monkeypatch, peft_case.base_dir, [peft_case.adapter_dir], our_merge(peft_case.name))
    _assert_same_reports(blocked, whole)
    assert blocked.equivalent


def test_bit_trick_ulp_is_frexp_ulp_bit_for_bit() -> None:
    """The float64 bit trick (ulp_into, used by both verify paths for fp32, bf16 and fp16)
    reproduces the independent frexp formula's float32 rounding, at binade edges too."""
    from lora_tools.verify.block_math import row_blocks
    from lora_tools.verify.figures import frexp_ulp, ulp_into

    powers = torch.exp2(torch.arange(-150, 20, dtype=torch.float64))
    edges = torch.cat([powers * f for f in (1.0, 1 - 2.0**-25, 1 - 2.0**-24, (1 - 2.0**-25) * (1 + 2.0**-40),
                                             (1 - 2.0**-25) * (1 - 2.0**-40), 1 + 2.0**-30)])
    values = torch.cat([edges, -edges, torch.zeros(3, dtype=torch.float64), torch.randn(10_000, dtype=torch.float64)])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(ulp_into(values.abs(), dtype), frexp_ulp(values, dtype).to(torch.float64)), dtype
    for rows in range(1, 40):
        blocks = row_blocks(rows, 64, 200)
        assert blocks[0][0] == 0 and blocks[-1][1] == rows and all(hi - lo >= 2 for lo, hi in blocks[:-1] if rows > 1)
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert rows == 1 or all(hi - lo >= 2 for lo, hi in blocks)


def test_block_reader_names_a_file_cut_short_after_it_was_opened(tmp_path: Path) -> None:
    """The header promised the bytes; a file truncated since is a FormatError naming it."""
    from lora_tools.errors import FormatError
    from lora_tools.io.safetensors_file import SafetensorsFile
    from lora_tools.verify.blocks import BlockReader

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8)}, path)
    shard = SafetensorsFile(path)
    reader = BlockReader()
    assert torch.equal(reader.rows(shard, shard.info("w"), 2, 5, 8, 0), torch.arange(16, 40, dtype=torch.float32))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(FormatError, match="file ended early") as caught:
        reader.rows(shard, shard.info("w"), 60, 64, 8, 0)
    assert str(path) in str(caught.value)
    shard.close()
