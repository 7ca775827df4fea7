"""verify's bounded row blocks (issue #19): the same verdicts and figures as the reference.

For bf16/fp16 checkpoints, `block_math.judge_block_bounded` skips the float32 slack of
every element: |error| / (eps·spacing) bounds each element's ×tolerance from above, the
slack is computed only for blocks that may hold the tensor's worst element, and the
strength allowance is bounded from the factors (`figures.slack_shift_bound`), the tensor
redone in full where that bound is not enough. These tests put elements right at the
tolerance edge (inside it only thanks to the slack, and just outside), force the
fallback, and hold every report to the reference paths: the row blocks with every
element's slack (`check_plain_tensor(bounded=False)`) and the whole-tensor check.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import PeftCase
from safetensors.torch import load_file, save_file
from test_verify import PEFT_PREFIX, Q0, SMALL_BLOCK, _assert_same_reports, lora_factors, write_checkpoint

EDGE = (40, 7)  # (row, column) of Q0 put at the tolerance edge: row 40 lies in block 3 of 16-row blocks


def _reports(monkeypatch: pytest.MonkeyPatch, *args: object, **kwargs: object) -> dict[str, object]:
    """The report of each path on the same inputs, small blocks for the row-block ones."""
    from lora_tools.verify import block_math, blocks
    from lora_tools.verify import operation as verify_module

    reports: dict[str, object] = {}
    for name, bounded in (("bounded", True), ("reference", False)):
        calls = {"bounded": 0, "reference": 0}
        with monkeypatch.context() as patch:
            patch.setattr(block_math, "BLOCK_ELEMENTS", SMALL_BLOCK)
            patch.setattr(verify_module, "check_plain_tensor",
                          functools.partial(blocks.check_plain_tensor, bounded=bounded, screen=False))
            for kind, judge in (("bounded", blocks.judge_block_bounded), ("reference", blocks.judge_block)):
                patch.setattr(blocks, judge.__name__, functools.partial(_counted, judge, calls, kind))
            reports[name] = verify_module.verify(*args, **kwargs)
        reports[f"{name} blocks"] = calls
    with monkeypatch.context() as patch:
        patch.setattr(verify_module, "check_plain_tensor", lambda *a, **k: None)
        reports["whole"] = verify_module.verify(*args, **kwargs)
    return reports


def _counted(judge: Callable[..., None], calls: dict[str, int], kind: str, *args: object, **kwargs: object) -> None:
    calls[kind] += 1
    judge(*args, **kwargs)


def _all_agree(reports: dict[str, object]) -> None:
    for name in ("reference", "whole"):
        _assert_same_reports(reports["bounded"], reports[name])


def _edge_case(case: PeftCase, root: Path, tilt: float) -> tuple[Path, Path, dict[str, float]]:
    """An fp32 adapter on the bf16 base whose Q0 has, at EDGE, ΔW = −tilt·2⁻²¹ with
    |s|·|B|·|A| = 2 there (so the slack, 2·eps32·|s|·|B|·|A|, is ~2⁻²⁰), and a merge that
    is W0 + ΔW rounded to bf16 everywhere but at EDGE, where it is the bf16 number one
    ulp above W0: the error there is ulp + tilt·2⁻²¹, past one ulp, within the tolerance
    ulp + slack for tilt < 2, beyond it for tilt > 2."""
    adapter = root / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = {k: v.float() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    module = Q0.removesuffix(".weight")
    a_key, b_key = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
    a, b = factors[a_key], factors[b_key]
    scale = config["lora_alpha"] / config["r"]
    row, col = EDGE
    t = 0.5 / scale  # |s|·(|b₀a₀| + |b₁a₁|) = s·t·(2 + ε) ≈ 2
    eps = tilt * 2.0**-22
    b[row] = torch.tensor([1.0, 1.0] + [0.0] * (b.shape[1] - 2))
    a[:, col] = torch.tensor([t, -t * (1 + eps)] + [0.0] * (a.shape[0] - 2))
    save_file(factors, adapter / "adapter_model.safetensors")
    base = load_file(case.base_dir / "model.safetensors")
    tensors = dict(base)
    layers = lora_factors(adapter)
    for name, (fb, fa, s) in layers.items():
        tensors[name] = (base[name].double() + s * (fb.double() @ fa.double())).to(base[name].dtype)
    w0 = base[Q0][row, col]
    assert float(w0) > 0
    up = (w0.float() * (1 + 2.0**-8)).to(torch.bfloat16)  # the next bf16 number above W0
    tensors[Q0][row, col] = up
    merged = write_checkpoint(case.base_dir, root / "merged", tensors)
    ulp = float(up.float() - w0.float())
    fb, fa, s = layers[Q0]
    delta = s * float(fb[row].double() @ fa[:, col].double())
    slack = 2 * 2.0**-23 * abs(s) * float(fb[row].double().abs() @ fa[:, col].double().abs())
    return adapter, merged, {"ulp": ulp, "error": ulp - delta, "slack": slack}


@pytest.mark.parametrize("tilt", [1.0, 4.0], ids=["inside-by-the-slack", "beyond"])
def test_an_element_at_the_tolerance_edge_gets_the_reference_verdict(
    tilt: float, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = peft_case_factory("llama_bf16")
    adapter, merged, at = _edge_case(case, tmp_path, tilt)
    # The element is past one ulp: the bound without the slack does not decide it.
    assert at["error"] > at["ulp"]
    assert (at["error"] <= at["ulp"] + at["slack"]) is (tilt < 2)
    reports = _reports(monkeypatch, case.base_dir, [adapter], merged)
    _all_agree(reports)
    assert reports["bounded blocks"]["reference"] == 0 < reports["bounded blocks"]["bounded"]  # no fallback
    q0 = next(t for t in reports["bounded"].tensors if t.name == Q0)
    expected_worst = at["error"] / (at["ulp"] + at["slack"])
    if tilt < 2:
        assert q0.verdict == "ok" and q0.worst_ulps <= 1.0, q0
        assert q0.worst_ulps == pytest.approx(expected_worst, rel=1e-6)
    else:
        assert q0.verdict == "mismatch" and q0.worst_ulps > 1.0, q0
        assert "[40, 7]" in q0.detail
    assert q0.worst_ulps == pytest.approx(expected_worst, rel=1e-6)


def test_the_allowance_fallback_gives_the_reference_report(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the factors cannot show that the slack leaves the strength allowance to σ_k,
    the tensor is judged again with every element's slack; forced here for every tensor,
    on a healthy merge and on a 5 % one."""
    from lora_tools.verify import blocks

    case = peft_case_factory("llama_bf16")
    monkeypatch.setattr(blocks, "slack_shift_bound", lambda *a: math.inf)
    base = load_file(case.base_dir / "model.safetensors")
    deltas = {k: s * (b.double() @ a.double()) for k, (b, a, s) in lora_factors(case.adapter_dir).items()}
    for strength in (1.0, 1.05):
        tensors = {k: (v.double() + strength * deltas[k]).to(v.dtype) if k in deltas else v for k, v in base.items()}
        merged = write_checkpoint(case.base_dir, tmp_path / f"merged-{strength}", tensors)
        reports = _reports(monkeypatch, case.base_dir, [case.adapter_dir], merged)
        calls = reports["bounded blocks"]
        assert calls["reference"] == calls["bounded"] > 0  # every tensor judged again, in full
        _all_agree(reports)
        assert reports["bounded"].equivalent is (strength == 1.0)


def test_slack_shift_bound_is_an_upper_bound() -> None:
    """Against the shift as the reference computes it (float32 slack, float64 sums), on
    random factors and on factors that cancel (|B|·|A| ≫ |B·A|)."""
    from lora_tools.verify.figures import slack_factor, slack_into, slack_shift_bound

    g = torch.Generator().manual_seed(5)
    for cancel in (0.0, 0.999):
        b = torch.randn(96, 8, generator=g)
        a = torch.randn(8, 80, generator=g)
        a[1] = -cancel * a[0] + (1 - cancel) * a[1]
        b[:, 1] = b[:, 0]
        for factor in (2.0, 0.3):
            slack = slack_into(torch.empty(96, 80), torch.empty(96, 80), [slack_factor(b, a, factor)], 0, 96)
            update = factor * (b.double() @ a.double())
            shift = float((slack.double() * update.abs()).sum()) / float((update * update).sum())
            bound = slack_shift_bound([slack_factor(b, a, factor)], float((update * update).sum()), update.numel())
            assert shift <= bound <= 50 * shift, (cancel, factor, shift, bound)


def test_two_bf16_adapters_with_weights_by_bounded_blocks(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several layers on one bf16 tensor (the expectation's GEMMs chained), weights that
    are no power of two, right and wrong."""
    from cli_run import run_cli

    case = peft_case_factory("llama_bf16")
    second = tmp_path / "second"
    shutil.copytree(case.adapter_dir, second)
    factors = load_file(second / "adapter_model.safetensors")
    save_file({k: (v.float() * 0.7).to(v.dtype) for k, v in factors.items()}, second / "adapter_model.safetensors")
    merged = tmp_path / "merged"
    weights = ("--weight", 0.6, "--weight", -0.35)
    code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, second, *weights, "-o", merged, "-q")
    assert code == 0, err
    for given in ([0.6, -0.35], [0.6, 0.35]):
        reports = _reports(monkeypatch, case.base_dir, [case.adapter_dir, second], merged, weights=given)
        _all_agree(reports)
        assert reports["bounded"].equivalent is (given[1] < 0)


@pytest.mark.parametrize("workers", [1, 3])
def test_the_report_does_not_depend_on_the_workers(
    workers: int, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks dealt to several threads, their sums folded: the figures of one thread to
    float64 rounding, the first worst element the same."""
    from lora_tools.verify import block_math
    from lora_tools.verify.operation import verify

    case = peft_case_factory("llama_bf16")
    base = load_file(case.base_dir / "model.safetensors")
    deltas = {k: s * (b.double() @ a.double()) for k, (b, a, s) in lora_factors(case.adapter_dir).items()}
    tensors = {k: (v.double() + 0.5 * deltas[k]).to(v.dtype) if k in deltas else v for k, v in base.items()}
    merged = write_checkpoint(case.base_dir, tmp_path / "half", tensors)
    monkeypatch.setattr(block_math, "BLOCK_ELEMENTS", SMALL_BLOCK)
    one = verify(case.base_dir, [case.adapter_dir], merged, workers=1)
    many = verify(case.base_dir, [case.adapter_dir], merged, workers=workers)
    _assert_same_reports(many, one)
    assert [t.detail for t in many.tensors] == [t.detail for t in one.tensors]


def test_spacing_of_the_max_is_bit_for_bit_the_spacing_of_the_max() -> None:
    """`spacing_of_max_into` (integer passes) against `spacing_into(max(|E|, |W0|))`, at
    binade edges, zeros, subnormals and signs, for every dtype it serves."""
    from lora_tools.verify.figures import spacing_into, spacing_of_max_into

    g = torch.Generator().manual_seed(3)
    powers = torch.exp2(torch.arange(-150, 20, dtype=torch.float64))
    edges = torch.cat([powers * f for f in (1.0, 1 - 2.0**-25, 1 - 2.0**-24, (1 - 2.0**-25) * (1 + 2.0**-40), 1 + 2.0**-30)])
    expected = torch.cat([edges, -edges, torch.zeros(4, dtype=torch.float64), torch.randn(5000, generator=g, dtype=torch.float64)])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = torch.cat([torch.randn(expected.numel() - 8, generator=g), torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-14, 6e-8, 1.0, -3.0])])
        base = base[torch.randperm(base.numel(), generator=g)].to(dtype).to(torch.float64)
        want = spacing_into(torch.maximum(expected.abs(), base.abs()), dtype)
        got = spacing_of_max_into(expected.clone(), base.clone(), dtype)
        assert torch.equal(got, want), dtype


def test_same_bytes_compares_every_byte() -> None:
    from lora_tools.verify.reader import same_bytes

    for size in (0, 1, 7, 8, 9, 4096 + 5):
        a = torch.arange(size, dtype=torch.int64).to(torch.uint8)
        assert same_bytes(a, a.clone())
        for where in {0, size // 2, size - 1} if size else set():
            b = a.clone()
            b[where] ^= 1
            assert not same_bytes(a, b), (size, where)
    assert not same_bytes(torch.zeros(8, dtype=torch.uint8), torch.zeros(9, dtype=torch.uint8))


# --------------------------------------------------------------------------- verify --device
# A GPU verify moves W0 and MERGED through merge's pinned chunks (`engine.staging.CudaStaging`)
# and judges each plain tensor whole, on the device. There is no GPU here: the same path
# runs on the CPU, with CudaStaging's CUDA events and device guard stubbed out as
# tests/test_merge.py does (CPU copies are synchronous). tests/test_cuda.py runs it on a GPU.


@pytest.fixture
def staged_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """verify's device path on the CPU; returns the names loaded through the staging."""
    import contextlib

    from lora_tools.engine import staging
    from lora_tools.verify import blocks

    class Event:
        def record(self) -> None: ...

        def synchronize(self) -> None: ...

    loads: list[str] = []
    real_load = staging.CudaStaging.load
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(staging.CudaStaging, "load", lambda self, src, name, reuse=True: loads.append(name) or real_load(self, src, name, reuse))
    monkeypatch.setattr(blocks, "device_staging", lambda device: staging.CudaStaging(device, chunk_bytes=1000))
    return loads


@pytest.mark.parametrize("corruption", ["healthy", "half", "layers_swapped", "adapted_element_moved"])
@pytest.mark.parametrize("kind", ["llama_bf16", "llama_plain"])
def test_the_device_path_reports_what_the_row_blocks_report(
    kind: str, corruption: str, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path,
    staged_on_the_cpu: list[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_verify import CORRUPTIONS, Setting, plain_lora_deltas

    from lora_tools.verify.operation import verify

    case = peft_case_factory(kind)
    setting = Setting(case, load_file(case.base_dir / "model.safetensors"), plain_lora_deltas(case.adapter_dir), tmp_path)
    build = (lambda s: s.merged()) if corruption == "healthy" else CORRUPTIONS[corruption][0]
    merged = write_checkpoint(case.base_dir, tmp_path / corruption, build(setting))
    staged = verify(case.base_dir, [case.adapter_dir], merged, device="cpu")
    assert sorted(set(staged_on_the_cpu)) == sorted(setting.deltas)  # every adapted tensor went through the staging
    with monkeypatch.context() as patch:
        from lora_tools.verify import blocks

        from lora_tools.verify import operation as verify_module

        patch.setattr(blocks, "device_staging", lambda device: None)
        patch.setattr(verify_module, "check_plain_tensor", functools.partial(blocks.check_plain_tensor, screen=False))
        blocked = verify(case.base_dir, [case.adapter_dir], merged)
    _assert_same_reports(staged, blocked)
    assert [t.detail for t in staged.tensors] == [t.detail for t in blocked.tensors]
    assert staged.equivalent is (corruption == "healthy")


def test_a_cpu_merge_replays_through_the_device_path(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, staged_on_the_cpu: list[str]
) -> None:
    """On the CPU device the staged path replays merge's CPU arithmetic (fused): the
    recipe is found for every tensor, as by the row blocks."""
    from cli_run import run_cli

    from lora_tools.verify.operation import verify

    case = peft_case_factory("llama_bf16")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, "-o", out, "--device", "cpu", "-q")
    assert code == 0, err
    report = verify(case.base_dir, [case.adapter_dir], out, device="cpu")
    assert report.equivalent and staged_on_the_cpu
    assert {t.recipe for t in report.tensors} == {"fp32 round-once (lora-tools; PEFT with fp32 adapter weights)"}


def test_verify_device_option(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path) -> None:
    from cli_run import run_cli

    case = peft_case_factory("llama_bf16")
    out = tmp_path / "merged"
    code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, "-o", out, "--device", "cpu", "-q")
    assert code == 0, err
    code, stdout, _ = run_cli("verify", case.base_dir, case.adapter_dir, out, "--device", "cpu", "--json")
    assert code == 0 and json.loads(stdout)["equivalent"] is True
    code, _, stderr = run_cli("verify", case.base_dir, case.adapter_dir, out, "--device", "tpu")
    assert code == 2 and "device" in stderr and "tpu" in stderr
    if not torch.cuda.is_available():
        code, _, stderr = run_cli("verify", case.base_dir, case.adapter_dir, out, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in stderr
