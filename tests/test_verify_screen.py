"""verify's float32 screen (issue #19): it only ever says "ok", and only where the exact check does.

`screen.screen_block` replays merge's float32 recipe block by block and accepts a bf16
or fp16 tensor whose bytes it gives, that is not its base, and whose strength spread is
far from the inconclusive limit; its figures come from float32 values with float64 sums.
Everything else goes to the exact row blocks. These tests run healthy merges (made by
`lora-tools merge`, so that the recipe matches), every injected corruption, a merge
whose update vanishes in bf16, and PEFT's GPU recipe through verify with and without
the screen, and require: the same verdicts, recipes and details everywhere; the same
figures, bit for bit, for every tensor the screen did not accept; and for the ones it
did, figures within what float32's rounding of the expectation explains
(docs/math.md, "The float32 screen").
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import PeftCase
from cli_run import run_cli
from safetensors.torch import load_file, save_file
from test_verify import CORRUPTIONS, SMALL_BLOCK, Setting, _bf16_gpu_style_merge, plain_lora_deltas, write_checkpoint

SPREAD_BOUNDS: dict[str, float] = {}  # tensor name → `screen.spread_bound` where the screen accepted it
FIGURES = ("max_abs_error", "max_rel_error", "worst_ulps", "strength", "strength_spread", "forward_rel_error")
# How far a screened figure may lie from the exact check's (relative): R = fl32(W0 + ΔW)
# stands for E, ~2⁻²⁴·|W0| away, 2⁻¹⁵ of a bf16 ulp; the exact tolerance adds the float32
# slack (2⁻¹⁶ of it); the forward products are float32 (docs/math.md). Measured on these
# models: worst_ulps 3.5e-4 (the slack), the others ≤ 2e-5. k − 1, a sum of rounding errors,
# is held to its own spread σ_k: 6e-5 of it with one adapter, 1.7e-3 with two weighted ones
# (merge's unfused recipe rounds each scaled product and each add in float32).
SCREEN_REL = 1e-3
STRENGTH_REL = 1e-2


def _screened_and_exact(
    monkeypatch: pytest.MonkeyPatch, *args: object, **kwargs: object
) -> tuple[object, object, object, list[str]]:
    """(report with the screen, report by the exact blocks, by the whole-tensor check,
    names of the tensors the screen accepted), small blocks for the row-block paths."""
    from lora_tools.verify import block_math, blocks
    from lora_tools.verify import operation as verify_module

    accepted: list[str] = []
    real, real_bound = blocks._screened, blocks.spread_bound
    bounds: list[float] = []

    def recording(plan: object, *a: object) -> object:
        del bounds[:]
        check = real(plan, *a)  # type: ignore[arg-type]
        if check is not None:
            accepted.append(check.name)
            SPREAD_BOUNDS[check.name] = bounds[-1]
        return check

    def bound(*a: object) -> float:
        bounds.append(real_bound(*a))  # type: ignore[arg-type]
        return bounds[-1]

    with monkeypatch.context() as patch:
        patch.setattr(block_math, "BLOCK_ELEMENTS", SMALL_BLOCK)
        patch.setattr(blocks, "_screened", recording)
        patch.setattr(blocks, "spread_bound", bound)
        screened = verify_module.verify(*args, **kwargs)
        patch.setattr(verify_module, "check_plain_tensor", functools.partial(blocks.check_plain_tensor, screen=False))
        exact = verify_module.verify(*args, **kwargs)
        patch.setattr(verify_module, "check_plain_tensor", lambda *a, **k: None)
        whole = verify_module.verify(*args, **kwargs)
    return screened, exact, whole, accepted


def _assert_screen_agrees(screened: object, exact: object, accepted: list[str]) -> None:
    assert screened.equivalent == exact.equivalent
    assert [t.name for t in screened.tensors] == [t.name for t in exact.tensors]
    for s, e in zip(screened.tensors, exact.tensors):
        assert (s.verdict, s.dtype, s.recipe, s.detail) == (e.verdict, e.dtype, e.recipe, e.detail), (s, e)
        for figure in FIGURES:
            got, want = getattr(s, figure), getattr(e, figure)
            if s.name not in accepted:
                assert got == want, (s.name, figure)  # not screened: the exact check's own figures
            elif figure == "strength":  # k − 1 is a sum of rounding errors: held to its own spread
                assert abs(got - want) <= STRENGTH_REL * e.strength_spread, (s.name, got, want)
            else:
                assert got == pytest.approx(want, rel=SCREEN_REL, abs=1e-300), (s.name, figure)
    for name in accepted:
        assert next(t for t in screened.tensors if t.name == name).verdict == "ok"
        exact_spread = next(t for t in exact.tensors if t.name == name).strength_spread
        assert exact_spread <= SPREAD_BOUNDS[name] < 1000 * exact_spread  # an upper bound, and a useful one


def _lora_tools_merge(case: PeftCase, out: Path, *extra: object) -> Path:
    code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, *extra, "-o", out, "-q")
    assert code == 0, err
    return out


@pytest.mark.parametrize(("kind", "dtype"), [("llama_bf16", "keep"), ("llama_bf16", "fp16"), ("llama_plain", "bf16")])
def test_the_screen_accepts_a_healthy_merge_with_the_exact_verdicts(
    kind: str, dtype: str, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 and fp16 checkpoints, from a base of the same dtype, of another 16-bit dtype,
    and from an fp32 base."""
    case = peft_case_factory(kind)
    merged = _lora_tools_merge(case, tmp_path / "merged", "--dtype", dtype)
    screened, exact, whole, accepted = _screened_and_exact(monkeypatch, case.base_dir, [case.adapter_dir], merged)
    assert sorted(accepted) == sorted(plain_lora_deltas(case.adapter_dir))  # every plain tensor, by the screen
    assert screened.equivalent
    _assert_screen_agrees(screened, exact, accepted)
    for s, w in zip(screened.tensors, whole.tensors):  # and against the whole-tensor check (float64)
        assert (s.verdict, s.recipe) == (w.verdict, w.recipe)
        for figure in FIGURES:
            if figure == "strength":
                assert abs(s.strength - w.strength) <= STRENGTH_REL * w.strength_spread
            else:
                assert getattr(s, figure) == pytest.approx(getattr(w, figure), rel=SCREEN_REL, abs=1e-300), (s.name, figure)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_the_screen_leaves_every_corruption_to_the_exact_check(
    corruption: str, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each corrupt copy of a lora-tools merge: the corrupt tensors are not accepted, and
    the report is the exact check's."""
    case = peft_case_factory("llama_bf16")
    healthy = _lora_tools_merge(case, tmp_path / "healthy")
    setting = Setting(case, load_file(case.base_dir / "model.safetensors"), plain_lora_deltas(case.adapter_dir), tmp_path)
    build, targets, verdict, _ = CORRUPTIONS[corruption]
    corrupt = build(setting)
    ours = load_file(healthy / "model.safetensors")
    touched = [n for n in corrupt if n in ours and not torch.equal(corrupt[n], setting.merged()[n])] if targets else []
    tensors = {n: (corrupt[n] if n in touched or n not in setting.deltas else ours[n]) for n in ours}
    if corruption == "unadapted_element_moved":
        tensors = {**ours, **{n: corrupt[n] for n in corrupt if n not in setting.deltas}}
    assert bool(touched) is (corruption != "unadapted_element_moved")
    merged = write_checkpoint(case.base_dir, tmp_path / corruption, tensors)
    screened, exact, _, accepted = _screened_and_exact(monkeypatch, case.base_dir, [case.adapter_dir], merged)
    assert not screened.equivalent
    assert not set(accepted) & set(touched)
    for name in touched:
        assert next(t for t in screened.tensors if t.name == name).verdict == verdict
    _assert_screen_agrees(screened, exact, accepted)


def test_an_update_that_vanishes_is_left_to_the_exact_check(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter so small that merge's bytes are the base's: the recipe replays, but the
    screen does not accept a tensor equal to its base (not applied? inconclusive?): the
    exact check decides, as without the screen."""
    case = peft_case_factory("llama_bf16")
    tiny = tmp_path / "tiny"
    shutil.copytree(case.adapter_dir, tiny)
    factors = load_file(tiny / "adapter_model.safetensors")
    save_file({k: (v.float() * 1e-4).to(v.dtype) for k, v in factors.items()}, tiny / "adapter_model.safetensors")
    merged = tmp_path / "merged"
    code, _, err = run_cli("merge", case.base_dir, tiny, "-o", merged, "-q")
    assert code == 0, err
    screened, exact, _, accepted = _screened_and_exact(monkeypatch, case.base_dir, [tiny], merged)
    assert accepted == []
    assert {t.verdict for t in screened.tensors} <= {"inconclusive", "not applied", "ok"}
    _assert_screen_agrees(screened, exact, accepted)


def test_peft_gpu_recipe_is_left_to_the_exact_check(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge by another recipe (PEFT on a GPU, bf16 GEMMs): not merge's bytes, not
    accepted; the exact check names PEFT's recipe."""
    case = peft_case_factory("llama_bf16")
    adapter, tensors = _bf16_gpu_style_merge(case, tmp_path)
    merged = write_checkpoint(case.base_dir, tmp_path / "gpu", tensors)
    screened, exact, _, accepted = _screened_and_exact(monkeypatch, case.base_dir, [adapter], merged)
    assert accepted == []
    assert screened.equivalent
    _assert_screen_agrees(screened, exact, accepted)


def test_two_weighted_adapters_are_screened_by_merge_s_unfused_recipe(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights that are no power of two: merge's unfused arithmetic (product, scaling, add
    per layer), replayed by the screen; the wrong weights are left to the exact check."""
    case = peft_case_factory("llama_bf16")
    second = tmp_path / "second"
    shutil.copytree(case.adapter_dir, second)
    factors = load_file(second / "adapter_model.safetensors")
    save_file({k: (v.float() * 0.7).to(v.dtype) for k, v in factors.items()}, second / "adapter_model.safetensors")
    merged = _lora_tools_merge(case, tmp_path / "merged", second, "--weight", 0.6, "--weight", -0.35)
    for weights, healthy in (([0.6, -0.35], True), ([0.6, 0.35], False)):
        screened, exact, _, accepted = _screened_and_exact(monkeypatch, case.base_dir, [case.adapter_dir, second], merged, weights=weights)
        assert screened.equivalent is healthy
        assert (sorted(accepted) == sorted(plain_lora_deltas(case.adapter_dir))) if healthy else accepted == []
        _assert_screen_agrees(screened, exact, accepted)
