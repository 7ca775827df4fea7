"""FP8 bases: reading them, merging into them (dequantized or re-quantized), refusing
what cannot be read. Bases are quantized in the test run by transformers' own
`Fp8Quantize` (tests/fp8_builders.py); transformers' dequantizing load and PEFT's
merge_and_unload on it are the oracles, float64 codes×scales the truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_run import run_cli
from fp8_builders import assert_same_fp8_merges, build_block_fp8_base, build_channel_fp8_base, dequantized64
from lora_tools.errors import CheckFailed, FormatError, RequestError
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.fp8 import ScaleRule, dequantize, requantize, step_of
from lora_tools.merge import merge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp8_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fp8")


@pytest.fixture(scope="module")
def block_base(fp8_root: Path, llama_plain_case) -> Path:
    return build_block_fp8_base(llama_plain_case.base_dir, fp8_root / "block16")


@pytest.fixture(scope="module")
def channel_base(fp8_root: Path, llama_plain_case) -> Path:
    return build_channel_fp8_base(llama_plain_case.base_dir, fp8_root / "channel")


def _update64(case, name: str) -> torch.Tensor:
    """ΔW of one adapted weight in float64, from PEFT's own factors and scale."""
    config = case.adapter_config
    tensors = load_file(case.adapter_file)
    module = name.removesuffix(".weight")
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    rank = a.shape[0]
    scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    return scale * (b @ a)


def _adapted(case) -> set[str]:
    keys = load_file(case.adapter_file)
    return {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight") for k in keys if ".lora_A." in k}


def _ulps_bf16(ours: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest |ours − truth| in units of bf16's spacing at truth."""
    spacing = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(truth.abs().clamp_min(1e-30))))
    return float(((ours.double() - truth).abs() / spacing).max())


# -- the codec ------------------------------------------------------------------------

@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_codec_is_transformers_bit_for_bit(scale_fmt: str) -> None:
    """Fresh scales, codes and dequantization equal transformers' Fp8Quantize and
    Fp8Dequantize, an all-zero block included."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    w = 0.05 * torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    w[:16, :32] = 0
    config = FineGrainedFP8Config(weight_block_size=[16, 32], scale_fmt=scale_fmt)
    theirs = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("x.weight", w)
    scale_dtype = theirs["x.weight_scale_inv"].dtype
    codes, scales = requantize(w, (16, 32), torch.float8_e4m3fn, scale_dtype, ScaleRule(True, scale_fmt == "ue8m0"))
    assert torch.equal(codes.view(torch.uint8), theirs["x.weight"].view(torch.uint8))
    assert scales.dtype == scale_dtype and torch.equal(scales.float(), theirs["x.weight_scale_inv"].float())
    dequantized = Fp8Dequantize(None)._dequantize_one(theirs["x.weight"], theirs["x.weight_scale_inv"], torch.float32)
    assert torch.equal(dequantize(codes, scales, (16, 32)), dequantized)


@pytest.mark.parametrize("shape,block", [((50, 70), (16, 32)), ((7, 130), (1, 130)), ((33, 5), (33, 5)), ((40, 90), (1, 32))])
def test_codec_partial_blocks_against_float64(shape: tuple[int, int], block: tuple[int, int]) -> None:
    """Edge blocks that are partial: dequantization is codes×scales rounded once to
    float32 (exact in float64), and re-quantization errs by at most half a step."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    codes, scales = requantize(w, block, torch.float8_e4m3fn, torch.bfloat16, ScaleRule(multiplier_first=False))
    rows, cols = shape
    full = scales.double().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    truth = codes.double() * full
    values = dequantize(codes, scales, block)
    assert torch.equal(values, truth.float())
    half_step = step_of(codes, scales, block).double() / 2
    assert bool(((values.double() - w.double()).abs() <= half_step * (1 + 1e-6)).all())


# -- reading ----------------------------------------------------------------------------

def test_base_reads_dequantized_weights_as_transformers_loads_them(block_base: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(block_base, dtype=torch.float32)  # dequantizes on a CPU
    state = model.state_dict()
    with BaseCheckpoint.open(block_base) as base:
        assert base.fp8 is not None and base.fp8.method == "fp8"
        assert len(base.fp8.weights) == 14 and all(w.block == (16, 16) for w in base.fp8.weights.values())
        for name in base.fp8.weights:
            assert torch.equal(base.torch(name), state[name]), name
            assert base.value_dtype(name) == "F32"
        assert all(name.endswith("_scale_inv") for name in base.fp8.aux)


def _load_dequantized(folder: Path) -> torch.nn.Module:
    """transformers' own dequantizing load of an FP8 folder (either family), float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if config["quant_method"] == "compressed-tensors":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # dequantizes on a CPU


def test_channel_base_layout(channel_base: Path) -> None:
    """compressed-tensors' per-channel scales; its own decompression (q times s in the
    scale's dtype, bf16) is q·s rounded to bf16, and q·s is exact in float32."""
    state = _load_dequantized(channel_base).state_dict()
    with BaseCheckpoint.open(channel_base) as base:
        assert base.fp8 is not None and base.fp8.method == "compressed-tensors"
        truth = dequantized64(channel_base)
        for name, scaled in base.fp8.weights.items():
            assert scaled.block == (1, base.info(name).shape[1])
            assert torch.equal(base.torch(name), truth[name].float()), name
            assert torch.equal(base.torch(name).to(torch.bfloat16).float(), state[name]), name


# -- merge, dequantized ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama_plain", "llama_rslora", "llama_dora"])
def test_merge_into_fp8_writes_bf16_equal_to_dequantize_then_peft(kind: str, block_base: Path, peft_case_factory, tmp_path: Path) -> None:
    """Default merge: every FP8 weight dequantized, the update added in float32, rounded
    once to bf16; equal to PEFT's merge_and_unload on transformers' dequantized load
    (in float32, rounded once), within one bf16 unit of the float64 truth; scales gone,
    config no longer FP8, and transformers loads it as a plain bf16 model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    case = peft_case_factory(kind)
    out = tmp_path / "merged"
    result = merge(block_base, [case.adapter_dir], out, device="cpu")
    assert result.fp8 == "dequantized"
    ours = load_file(out / "model.safetensors")
    assert not any(name.endswith("_scale_inv") for name in ours)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"

    dequantized = AutoModelForCausalLM.from_pretrained(block_base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(dequantized, case.adapter_dir).merge_and_unload().state_dict()
    truth = dequantized64(block_base)
    adapted = _adapted(case)
    for name, value in ours.items():
        if name in adapted and kind != "llama_dora":
            expected = truth[name] + _update64(case, name)
            assert _ulps_bf16(value, expected) <= 1.0, name
        if name in adapted:
            peft_value = peft[name].to(torch.bfloat16)
            assert (value.float() - peft_value.float()).abs().max() <= torch.finfo(torch.bfloat16).eps * peft_value.float().abs().max(), name
        else:  # dequantized or converted, rounded once
            assert torch.equal(value, truth[name].to(torch.bfloat16)), name
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in ours.items() if name in loaded)
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_merge_into_channel_fp8_base(channel_base: Path, llama_plain_case, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge(channel_base, [llama_plain_case.adapter_dir], out, device="cpu", dtype="fp32")
    ours = load_file(out / "model.safetensors")
    truth = dequantized64(channel_base)
    for name in _adapted(llama_plain_case):
        expected = truth[name] + _update64(llama_plain_case, name)
        assert float((ours[name].double() - expected).abs().max()) <= 4e-7 * float(expected.abs().max()), name
    assert not any(name.endswith("_scale") for name in ours)


def test_sharded_fp8_base_index_drops_scales(block_base: Path, llama_rslora_case_dir, tmp_path: Path) -> None:
    """A sharded FP8 base: the merged index lists no scale and its total_size is the
    bytes written; transformers loads the folder."""
    from transformers import AutoModelForCausalLM

    sharded = _sharded_copy(block_base, tmp_path / "sharded")
    out = tmp_path / "merged"
    merge(sharded, [llama_rslora_case_dir], out, device="cpu")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not any(name.endswith("_scale_inv") for name in index["weight_map"])
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == total
    AutoModelForCausalLM.from_pretrained(out)


@pytest.fixture(scope="module")
def llama_rslora_case_dir(peft_case_factory) -> Path:
    return peft_case_factory("llama_rslora").adapter_dir


def _sharded_copy(folder: Path, out: Path) -> Path:
    """The folder with its tensors split in two shards (a weight and its scale apart)."""
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        shard = f"model-0000{index}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


# -- merge, re-quantized ---------------------------------------------------------------------

@pytest.mark.parametrize("which", ["block", "channel"])
def test_merge_fp8_keeps_format_within_one_step(which: str, block_base: Path, channel_base: Path, peft_case_factory, tmp_path: Path) -> None:
    """--dtype fp8: same tensors, dtypes and shapes as the base; unadapted weights and
    their scales byte for byte; each adapted element within one FP8 step of the float64
    truth; the update survives; transformers (and compressed-tensors) load the output."""
    base = block_base if which == "block" else channel_base
    case = peft_case_factory("llama_rslora")
    out = tmp_path / "merged"
    result = merge(base, [case.adapter_dir], out, device="cpu", dtype="fp8")
    assert result.fp8 == "requantized" and (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in before.items()} == {k: (v.dtype, v.shape) for k, v in after.items()}
    adapted = _adapted(case)
    scale_suffix = "_scale_inv" if which == "block" else "_scale"
    truth = dequantized64(base)
    with BaseCheckpoint.open(out) as merged:
        assert merged.fp8 is not None
        for name, value in after.items():
            owner = name.removesuffix(scale_suffix)
            if name in adapted:
                scaled = merged.fp8.weights[name]
                values = merged.torch(name).double()
                step = step_of(value, after[scaled.scale], scaled.block).double()
                error = (values - (truth[name] + _update64(case, name))).abs()
                assert bool((error <= step).all()), name
            elif owner not in adapted:
                assert torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 else value, before[name].view(torch.uint8) if value.dtype.itemsize == 1 else before[name]), name
    assert len(result.survival) == len(adapted)
    assert all(s.survival is not None and 0.9 < s.survival < 1.1 for s in result.survival)
    assert not result.lost()
    state = _load_dequantized(out).state_dict()
    with BaseCheckpoint.open(out) as merged:
        for name in adapted:
            ours = merged.torch(name)
            assert torch.equal(ours.to(torch.bfloat16).float() if which == "channel" else ours, state[name]), name


def test_survival_figures_equal_their_float64_definitions(block_base: Path, peft_case_factory, tmp_path: Path) -> None:
    """Each adapted weight's figures, from the written file in float64: survival =
    ‖deq(Q(W0+ΔW)) − deq(W0's codes)‖_F / ‖ΔW‖_F, ‖ΔW‖_F itself (from the factors: two
    adapters at weights 0.7 and −0.4, so the Gram sums' cross terms count), and the
    share of codes that did not change. DoRA's update is not a product of factors: its
    ‖ΔW‖ is measured on the merged weight instead, and must still equal PEFT's."""
    plain, rslora = peft_case_factory("llama_plain"), peft_case_factory("llama_rslora")
    out = tmp_path / "merged"
    weights = (0.7, -0.4)
    result = merge(block_base, [plain.adapter_dir, rslora.adapter_dir], out, device="cpu", dtype="fp8", weights=list(weights))
    before, after = dequantized64(block_base), dequantized64(out)
    codes_before, codes_after = load_file(block_base / "model.safetensors"), load_file(out / "model.safetensors")
    figures = {s.name: s for s in result.survival}
    assert set(figures) == _adapted(plain) | _adapted(rslora)
    for name, figure in figures.items():
        update = sum(w * _update64(case, name) for w, case in zip(weights, (plain, rslora)) if name in _adapted(case))
        norm = float(torch.linalg.vector_norm(update))
        kept = float(torch.linalg.vector_norm(after[name] - before[name]))
        assert figure.update_norm == pytest.approx(norm, rel=1e-12), name
        assert figure.survival == pytest.approx(kept / norm, rel=1e-5), name
        same = codes_after[name].view(torch.uint8) == codes_before[name].view(torch.uint8)
        assert figure.unchanged == float(same.double().mean()), name

    dora = peft_case_factory("llama_dora")
    result = merge(block_base, [dora.adapter_dir], tmp_path / "dora", device="cpu", dtype="fp8")
    model = _load_dequantized(block_base)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model.double(), dora.adapter_dir).merge_and_unload().state_dict()
    before, after = dequantized64(block_base), dequantized64(tmp_path / "dora")
    for figure in result.survival:
        update = merged[figure.name] - before[figure.name]
        assert figure.update_norm == pytest.approx(float(torch.linalg.vector_norm(update)), rel=1e-5), figure.name
        kept = float(torch.linalg.vector_norm(after[figure.name] - before[figure.name]))
        assert figure.survival == pytest.approx(kept / figure.update_norm, rel=1e-5), figure.name


@pytest.mark.parametrize("which", ["block", "channel", "ue8m0"])
def test_requantizing_by_row_blocks_gives_the_whole_weights_bytes(
    which: str, block_base: Path, channel_base: Path, fp8_root: Path, peft_case_factory, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU re-quantizes a block of rows at a time (`Requantizing._by_blocks`, here one
    scale block of rows per block, the smallest there is): every byte of the output, and
    the survival figures, as the whole-weight path gives them; two adapters, so the row
    merge takes its multi-layer route."""
    import lora_tools.engine.fp8_stream as fp8_stream
    from lora_tools.merge import _Merger

    base = {"block": block_base, "channel": channel_base}.get(which) or build_block_fp8_base(
        peft_case_factory("llama_plain").base_dir, fp8_root / "ue8m0-blocks", scale_fmt="ue8m0")
    adapters = [peft_case_factory("llama_plain").adapter_dir, peft_case_factory("llama_rslora").adapter_dir]
    monkeypatch.setattr(fp8_stream, "BLOCK_ELEMENTS", 1)
    by_blocks = merge(base, adapters, tmp_path / "blocks", device="cpu", dtype="fp8", weights=[0.8, 1.5])
    monkeypatch.setattr(_Merger, "row_merge", lambda self, name: None)
    whole = merge(base, adapters, tmp_path / "whole", device="cpu", dtype="fp8", weights=[0.8, 1.5])
    assert_same_fp8_merges(by_blocks, tmp_path / "blocks", whole, tmp_path / "whole")


def test_requantizing_an_update_past_float32_is_refused(block_base: Path, llama_plain_case, tmp_path: Path) -> None:
    """A block whose merge is not finite sends the weight to the whole-weight path, whose
    refusal names it: one line, exit 2, nothing written."""
    adapter = tmp_path / "huge"
    shutil.copytree(llama_plain_case.adapter_dir, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.float() * 1e25 for k, v in tensors.items()}, adapter / "adapter_model.safetensors")  # ΔW ~1e50
    code, _, err = run_cli("merge", block_base, adapter, "-o", tmp_path / "m", "--dtype", "fp8", "-q")
    assert code == 2 and err.count("\n") == 1 and "produced NaN or Inf" in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m*"))


def test_update_below_fp8_resolution_is_reported_and_refused(block_base: Path, llama_plain_case, tmp_path: Path) -> None:
    """An adapter scaled down until FP8 cannot hold it: survival near 0, a warning on
    stderr naming the worst layers; --min-survival makes it exit 1 with nothing written."""
    result = merge(block_base, [llama_plain_case.adapter_dir], tmp_path / "a", device="cpu", dtype="fp8", weights=[1e-5])
    assert len(result.lost()) == len(result.survival) == 14
    assert all(s.survival is not None and s.survival < 0.5 and s.unchanged > 0.9 for s in result.survival)

    code, _, err = run_cli("merge", block_base, llama_plain_case.adapter_dir, "-o", tmp_path / "b", "--dtype", "fp8", "--weight", "1e-5", "-q")
    assert code == 0 and "Warning: FP8 re-quantization kept less than half of the update in 14 of 14 weights" in err
    code, _, err = run_cli("merge", block_base, llama_plain_case.adapter_dir, "-o", tmp_path / "c", "--dtype", "fp8",
                           "--weight", "1e-5", "--min-survival", "0.5", "-q")
    assert code == 1 and err.count("\n") == 1 and "nothing written" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))
    with pytest.raises(CheckFailed):
        merge(block_base, [llama_plain_case.adapter_dir], tmp_path / "d", device="cpu", dtype="fp8", weights=[1e-5], min_survival=0.5)
    assert not (tmp_path / "d").exists()


def test_ue8m0_scales_stay_powers_of_two(fp8_root: Path, llama_plain_case, tmp_path: Path) -> None:
    base = build_block_fp8_base(llama_plain_case.base_dir, fp8_root / "ue8m0", scale_fmt="ue8m0")
    out = tmp_path / "merged"
    merge(base, [llama_plain_case.adapter_dir], out, device="cpu", dtype="fp8")
    tensors = load_file(out / "model.safetensors")
    scales = [v for k, v in tensors.items() if k.endswith("_scale_inv")]
    assert scales and all(s.dtype == torch.float8_e8m0fnu for s in scales)
    for s in scales:
        values = s.float()
        assert torch.equal(values, torch.exp2(torch.round(torch.log2(values))))


# -- refusals ------------------------------------------------------------------------------

def _rewrite(folder: Path, out: Path, drop: str | None = None, config: dict | None = None) -> Path:
    shutil.copytree(folder, out)
    if drop is not None:
        tensors = load_file(out / "model.safetensors")
        del tensors[drop]
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        current = json.loads((out / "config.json").read_text())
        current["quantization_config"] = config
        (out / "config.json").write_text(json.dumps(current))
    return out


@pytest.mark.parametrize("problem", ["no_scale", "wrong_block", "gptq", "asymmetric"])
def test_bad_fp8_bases_exit_2_with_one_line(problem: str, block_base: Path, fp8_root: Path, llama_plain_case, tmp_path: Path) -> None:
    q = "model.layers.0.self_attn.q_proj.weight"
    if problem == "no_scale":
        base, says = _rewrite(block_base, tmp_path / "base", drop=q + "_scale_inv"), "has no scale"
    elif problem == "wrong_block":
        config = json.loads((block_base / "config.json").read_text())["quantization_config"]
        base, says = _rewrite(block_base, tmp_path / "base", config={**config, "weight_block_size": [32, 32]}), "in blocks of [32, 32] needs [2, 4]"
    elif problem == "gptq":
        base, says = _rewrite(block_base, tmp_path / "base", config={"quant_method": "gptq", "bits": 4}), "'gptq' is not supported"
    else:
        config = {"quant_method": "compressed-tensors", "format": "float-quantized",
                  "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "symmetric": False, "strategy": "channel"}}}}
        base, says = _rewrite(block_base, tmp_path / "base", config=config), "asymmetric"
    for args in (["merge", base, llama_plain_case.adapter_dir, "-o", tmp_path / "out", "-q"],
                 ["inspect", llama_plain_case.adapter_dir, "--base", base]):
        code, _, err = run_cli(*args)
        assert code == 2 and err.count("\n") == 1 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_fp8_options_need_an_fp8_base(llama_plain_case, block_base: Path, tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="no FP8 weights"):
        merge(llama_plain_case.base_dir, [llama_plain_case.adapter_dir], tmp_path / "a", device="cpu", dtype="fp8")
    with pytest.raises(RequestError, match="--min-survival applies to --dtype fp8"):
        merge(block_base, [llama_plain_case.adapter_dir], tmp_path / "b", device="cpu", min_survival=0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inspect_base_sees_dequantized_weights(block_base: Path, llama_plain_case) -> None:
    """inspect --base: ‖ΔW‖/‖W0‖ against the dequantized W0."""
    from lora_tools.inspect import inspect_adapter

    report = inspect_adapter(llama_plain_case.adapter_dir, base_path=block_base)
    truth = dequantized64(block_base)
    rows = {layer.name: layer for layer in report.layers}
    for name in _adapted(llama_plain_case):
        row = rows[name.removesuffix(".weight")]
        expected = float(torch.linalg.vector_norm(_update64(llama_plain_case, name)) / torch.linalg.vector_norm(truth[name]))
        assert row.relative_norm == pytest.approx(expected, rel=1e-5), name


def test_fp8_weight_without_config_or_scale_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"x.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, path)
    with pytest.raises(FormatError, match="has no scale"):
        BaseCheckpoint.open(path)


# -- verify ----------------------------------------------------------------------------------

@pytest.mark.parametrize("which,dtype", [("block", "keep"), ("block", "fp8"), ("channel", "keep"), ("channel", "fp8")])
def test_verify_accepts_fp8_merges(which: str, dtype: str, block_base: Path, channel_base: Path, peft_case_factory, tmp_path: Path) -> None:
    """verify against an FP8 base: the expectation is computed from the dequantized base;
    a bf16 merge is held to one bf16 unit, an FP8 merge to one FP8 step per element, and
    the strength fit comes out at 1."""
    from lora_tools.verify.operation import verify

    base = block_base if which == "block" else channel_base
    case = peft_case_factory("llama_rslora")
    out = tmp_path / "merged"
    merge(base, [case.adapter_dir], out, device="cpu", dtype=dtype)
    report = verify(base, [case.adapter_dir], out)
    assert report.equivalent, report
    assert report.n_adapted == len(_adapted(case)) and not report.changed_unadapted and not report.layout_problems
    for check in report.tensors:
        assert check.verdict == "ok", check
        assert check.strength is not None and abs(check.strength - 1) < 0.02, check


def test_verify_catches_fp8_merge_rounded_without_new_scales(block_base: Path, llama_plain_case, tmp_path: Path) -> None:
    """The axolotl / ms-swift bug: merged weights cast straight to e4m3 with the base's old
    scales kept: verify fails it (exit 1), naming the tensors."""
    good = tmp_path / "good"
    merge(block_base, [llama_plain_case.adapter_dir], good, device="cpu")
    merged = load_file(good / "model.safetensors")
    tensors = load_file(block_base / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(block_base / "config.json", bad / "config.json")
    for name in _adapted(llama_plain_case):
        tensors[name] = merged[name].float().clamp(-448, 448).to(torch.float8_e4m3fn)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run_cli("verify", block_base, llama_plain_case.adapter_dir, bad, "--json")
    assert code == 1
    document = json.loads(out)
    failed = {t["name"] for t in document["tensors"] if t["verdict"] not in ("ok", "inconclusive")}
    assert failed == _adapted(llama_plain_case)


def test_merge_verify_flag_on_fp8_base(block_base: Path, llama_plain_case, tmp_path: Path) -> None:
    for extra in ([], ["--dtype", "fp8"]):
        out = tmp_path / f"m{len(extra)}"
        code, _, err = run_cli("merge", block_base, llama_plain_case.adapter_dir, "-o", out, "--verify", "-q", *extra)
        assert code == 0, err


def test_verify_catches_half_strength_fp8_merge(block_base: Path, peft_case_factory, tmp_path: Path) -> None:
    """Within FP8's step or not, an update merged at half strength is seen by k."""
    from lora_tools.verify.operation import verify

    case = peft_case_factory("llama_rslora")
    out = tmp_path / "half"
    merge(block_base, [case.adapter_dir], out, device="cpu", dtype="fp8", weights=[0.5])
    report = verify(block_base, [case.adapter_dir], out)
    assert not report.equivalent
    assert {t.verdict for t in report.tensors} <= {"wrong strength", "mismatch"}
    assert all(t.strength is not None and abs(t.strength - 0.5) < 0.05 for t in report.tensors)


def test_scales_first_order_gives_the_same_tensors(block_base: Path, llama_plain_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scales of adapted weights are written after them; where that is not possible
    (alignment) the source's order is kept and each scale merges its weight once more.
    Both give the same tensors."""
    from lora_tools.engine.fp8_stream import Requantizing

    merge(block_base, [llama_plain_case.adapter_dir], tmp_path / "moved", device="cpu", dtype="fp8")
    with safe_open(tmp_path / "moved" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    monkeypatch.setattr(Requantizing, "reorder", lambda self, entries: entries)
    merge(block_base, [llama_plain_case.adapter_dir], tmp_path / "kept", device="cpu", dtype="fp8")
    moved, kept = load_file(tmp_path / "moved" / "model.safetensors"), load_file(tmp_path / "kept" / "model.safetensors")
    assert moved.keys() == kept.keys()
    assert all(torch.equal(moved[k].view(torch.uint8), kept[k].view(torch.uint8)) for k in moved)
    header = json.loads((tmp_path / "moved" / "model.safetensors").read_bytes()[8:][: int.from_bytes((tmp_path / "moved" / "model.safetensors").read_bytes()[:8], "little")])
    order = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in order][-14:] == sorted(k for k in names if k.endswith("_scale_inv"))  # scales last


def test_reorder_keeps_alignment() -> None:
    from lora_tools.engine.fp8_stream import Requantizing

    probe = Requantizing.__new__(Requantizing)
    probe.weight_of_scale = {"a.weight_scale_inv": "a.weight"}
    aligned = [("a.weight_scale_inv", "F32", (2, 2)), ("b", "BF16", (4,)), ("a.weight", "F8_E4M3", (8, 8))]
    assert [e[0] for e in probe.reorder(aligned)] == ["b", "a.weight", "a.weight_scale_inv"]
    odd = [("a.weight_scale_inv", "F32", (2, 2)), ("a.weight", "F8_E4M3", (7, 9))]
    assert probe.reorder(odd) == odd  # the scale would start at byte 63


def test_every_e4m3_code_dequantizes_exactly() -> None:
    """Dequantization gives codes×scales rounded once to float32 for all 254 finite e4m3
    codes, subnormals and signed zeros included; a NaN code stays NaN."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    q = finite[torch.randint(0, len(finite), (64, 96), generator=torch.Generator().manual_seed(7))]
    for row in range(3):  # every finite code somewhere
        part = finite[96 * row : 96 * (row + 1)]
        q[row, : len(part)] = part
    scales = torch.rand(4, 3, generator=torch.Generator().manual_seed(8)) * 1e-3
    truth = q.double() * scales.double().repeat_interleave(16, 0).repeat_interleave(32, 1)
    assert torch.equal(dequantize(q, scales, (16, 32)), truth.float())
    assert torch.equal(dequantize(q, scales, (16, 32)).view(torch.int32), truth.float().view(torch.int32))  # -0.0 too
    with_nan = q.clone()
    with_nan.view(torch.uint8)[5, 7] = 0xFF
    values = dequantize(with_nan, scales, (16, 32))
    assert bool(torch.isnan(values[5, 7])) and torch.equal(values[:5], truth[:5].float())


def test_every_e5m2_code_dequantizes_as_torch_casts_it() -> None:
    """The CPU's code table holds torch's own cast of every code: for e5m2 too (whose
    all-ones exponent holds ±inf and NaNs), in blocks of every code, scaled once."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2)
    q = codes.repeat(8).reshape(16, 128)
    scales = torch.tensor([[0.5, 3.0], [1e-3, 2.0**-20]])
    values = dequantize(q, scales, (8, 64))
    truth = q.to(torch.float32) * scales.repeat_interleave(8, 0).repeat_interleave(64, 1)
    same = (values == truth) | (torch.isnan(values) & torch.isnan(truth))
    assert bool(same.all()) and torch.equal(values.view(torch.int32)[~torch.isnan(values)],
                                            truth.view(torch.int32)[~torch.isnan(truth)])


@pytest.mark.parametrize("largest_scale", [3e-3, 1e3])
def test_row_dequantizer_by_bits_equals_torchs_cast_code_for_code(largest_scale: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """e4m3 codes widened by their bits (scales carrying 2¹²⁰, where they may) give what
    torch's cast times the block scale gives, every code, subnormals and signed zeros
    included; a block holding a NaN code comes out NaN as the cast's does. (The C kernels
    are left out here, as where they are not built: tests/test_kernels.py tests theirs.)"""
    import lora_tools.io.kernels as kernels
    from lora_tools.io.fp8 import RowDequantizer, _e4m3_bits_exact

    monkeypatch.setattr(kernels, "native", lambda: None)

    assert _e4m3_bits_exact()
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (96, 80), dtype=torch.uint8, generator=generator)
    codes[codes == 0x7F] = 0x01  # finite codes only here; every one of them occurs
    codes[codes == 0xFF] = 0x81
    codes.view(-1)[: 254] = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    q = codes.view(torch.float8_e4m3fn)
    scale = torch.rand((3, 3), generator=generator) * largest_scale + 1e-6
    rows = RowDequantizer(q, scale, (32, 32))
    assert (rows.rebiased is not None) == (largest_scale < 2**7)
    expected = q.float() * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)[:, :80]
    out = torch.empty(96, 80)
    for lo in range(0, 96, 32):
        rows(out[lo:lo + 32], lo, lo + 32)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    codes[40, 7] = 0xFF  # a NaN code: that block takes the table, whose NaN the merge refuses
    rows(out[32:64], 32, 64)
    assert torch.isnan(out[40, 7]) and torch.equal(out[32:64].isnan().sum(), torch.tensor(1))


@pytest.mark.parametrize("rule", [ScaleRule(), ScaleRule(multiplier_first=False), ScaleRule(power_of_two=True)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_requantize_clamps_exactly_where_a_value_passes_the_limit(rule: ScaleRule, scale_dtype: torch.dtype) -> None:
    """The clamp is skipped only where no scaled value passes 448; the codes equal those of
    scaling, clamping and casting every element. fp16 and bf16 scales round some blocks'
    scales down, so those blocks pass 448 a little and take the clamp; float32 ones never
    do; a block whose fp16 scale underflows takes fp16's smallest normal."""
    generator = torch.Generator().manual_seed(11)
    values = torch.randn(64, 96, generator=generator) * 3.0
    values[:32, :32] *= 1e-12  # a block whose scale underflows fp16: clamped
    values[32:, 64:] = 0.0  # an all-zero block: scale 1
    codes, stored = requantize(values.clone(), (32, 32), torch.float8_e4m3fn, scale_dtype, rule)
    grid = stored.float().repeat_interleave(32, 0).repeat_interleave(32, 1)
    if rule.multiplier_first and scale_dtype == torch.float32:
        multiplier = (1.0 / stored.float()) if rule.power_of_two else torch.where(
            stored.float() == 1.0, torch.ones_like(stored.float()),
            448.0 / block_amax_of(values, (32, 32)))
        scaled = values * multiplier.repeat_interleave(32, 0).repeat_interleave(32, 1)
    else:
        scaled = values / grid
    expected = scaled.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


def block_amax_of(values: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = values.shape
    return values.abs().view(rows // block[0], block[0], cols // block[1], block[1]).amax(dim=(1, 3))
