"""The CUDA path of merge and verify: same code as the CPU path, same bytes (or 1 ulp).

Skipped on machines without a GPU (CI); run on a GPU box with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_tools.merge import merge
from lora_tools.verify.operation import verify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = ["llama_plain", "llama_dora", "llama_bf16", "gpt2_conv1d", "llama_embedding", "llama_lora_bias"]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two same-dtype float tensors."""
    if a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    else:
        ia, ib = a.view(torch.int16).long(), b.view(torch.int16).long()
    return int((ia - ib).abs().max()) if a.numel() else 0


def _peft_merged_on_cuda(case) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=case.base_dtype).to("cuda").eval()
    merged = PeftModel.from_pretrained(model, case.adapter_dir).merge_and_unload()
    return {k: v.detach().cpu() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kind", CASES)
def test_cuda_merge_matches_peft_on_cuda_and_cpu_merge(kind: str, peft_case_factory, tmp_path: Path) -> None:
    """Within 1 ulp of PEFT's own CUDA merge; within 1 ulp of our CPU merge, except DoRA.

    DoRA's column norm is a reduction whose order differs between CPU and GPU kernels,
    in PEFT as in lora-tools, so the two devices may differ by a few float32 ulp there
    (the CPU merge equals PEFT's CPU merge; the CUDA one equals PEFT's CUDA merge).
    """
    case = peft_case_factory(kind)
    out_cpu, out_cuda = tmp_path / "cpu", tmp_path / "cuda"
    merge(case.base_dir, [case.adapter_dir], out_cpu, device="cpu")
    result = merge(case.base_dir, [case.adapter_dir], out_cuda, device="cuda")
    assert result.device.startswith("cuda")
    cpu = load_file(out_cpu / "model.safetensors")
    gpu = load_file(out_cuda / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    peft = _peft_merged_on_cuda(case)
    worst_peft = max(_ulps(gpu[k], peft[k].to(gpu[k].dtype)) for k in gpu if gpu[k].is_floating_point())
    assert worst_peft <= 1, f"CUDA merge is {worst_peft} ulp from PEFT's CUDA merge"
    worst_cpu = max(_ulps(cpu[k], gpu[k]) for k in cpu if cpu[k].is_floating_point())
    assert worst_cpu <= (4 if kind == "llama_dora" else 1), f"CPU and CUDA merges differ by {worst_cpu} ulp"
    report = verify(case.base_dir, [case.adapter_dir], out_cuda)
    assert report.equivalent, [t for t in report.tensors if t.verdict != "ok"]


def test_auto_device_picks_cuda(llama_plain_case, tmp_path: Path) -> None:
    result = merge(llama_plain_case.base_dir, [llama_plain_case.adapter_dir], tmp_path / "out", device="auto")
    assert result.device.startswith("cuda")


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith(".safetensors")}


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_small_pinned_chunks_give_the_same_bytes(
    llama_plain_case, llama_sharded_base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """Tensors that take many chunks through the two pinned buffers each way (reused
    while the GPU still copies from them) come out as with one chunk per tensor, and on
    a sharded base, with --dtype (a conversion only) as well."""
    from lora_tools.engine import staging

    adapter = [llama_plain_case.adapter_dir]
    merge(llama_sharded_base_dir, adapter, tmp_path / "big", device="cuda", dtype=dtype)
    monkeypatch.setattr(staging, "CUDA_CHUNK_BYTES", 4096)
    merge(llama_sharded_base_dir, adapter, tmp_path / "small", device="cuda", dtype=dtype)
    merge(llama_sharded_base_dir, adapter, tmp_path / "cpu", device="cpu", dtype=dtype)
    big, small = _tree_bytes(tmp_path / "big"), _tree_bytes(tmp_path / "small")
    assert len(big) > 1 and big == small
    cpu = {name: load_file(tmp_path / "cpu" / name) for name in big}
    for name in big:
        gpu = load_file(tmp_path / "big" / name)
        assert gpu.keys() == cpu[name].keys()
        worst = max((_ulps(gpu[k], cpu[name][k]) for k in gpu if gpu[k].is_floating_point()), default=0)
        assert worst <= 1, f"{name}: CPU and CUDA differ by {worst} ulp"
    assert verify(llama_sharded_base_dir, adapter, tmp_path / "small").equivalent


@pytest.mark.parametrize("dtype", ["keep", "fp8"])
def test_cuda_merge_into_fp8_base_matches_cpu(dtype: str, llama_plain_case, tmp_path: Path) -> None:
    """An FP8 base merged on the GPU: the dequantized output within 1 bf16 ulp of the CPU
    merge; re-quantized, the same scales and codes but where a merged value sits within a
    float32 ulp of an FP8 rounding boundary (at most one code apart)."""
    from fp8_builders import build_block_fp8_base

    base = build_block_fp8_base(llama_plain_case.base_dir, tmp_path / "fp8base")
    out_cpu, out_cuda = tmp_path / "cpu", tmp_path / "cuda"
    merge(base, [llama_plain_case.adapter_dir], out_cpu, device="cpu", dtype=dtype)
    merge(base, [llama_plain_case.adapter_dir], out_cuda, device="cuda", dtype=dtype)
    cpu, gpu = load_file(out_cpu / "model.safetensors"), load_file(out_cuda / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if cpu[name].dtype == torch.float8_e4m3fn:
            codes_cpu, codes_gpu = cpu[name].view(torch.uint8).long(), gpu[name].view(torch.uint8).long()
            assert int((codes_cpu - codes_gpu).abs().max()) <= 1 and float((codes_cpu != codes_gpu).float().mean()) < 1e-3, name
        elif cpu[name].is_floating_point():
            assert _ulps(cpu[name], gpu[name]) <= 1 if cpu[name].dtype != torch.float8_e8m0fnu else torch.equal(cpu[name], gpu[name]), name
    assert verify(base, [llama_plain_case.adapter_dir], out_cuda).equivalent


@pytest.mark.parametrize("kind", ["llama_plain", "llama_bf16"])
def test_verify_on_cuda(kind: str, peft_case_factory, tmp_path: Path) -> None:
    """verify --device cuda (issue #19): a CUDA merge is replayed bit for bit on the GPU
    (merge's GPU arithmetic, the tensor whole), a CPU merge passes by its tolerances, a
    half-strength merge fails; the figures agree with the CPU verify's."""
    case = peft_case_factory(kind)
    out_cpu, out_cuda = tmp_path / "cpu", tmp_path / "cuda"
    merge(case.base_dir, [case.adapter_dir], out_cpu, device="cpu")
    merge(case.base_dir, [case.adapter_dir], out_cuda, device="cuda")
    on_gpu = verify(case.base_dir, [case.adapter_dir], out_cuda, device="cuda")
    assert on_gpu.equivalent, [t for t in on_gpu.tensors if t.verdict != "ok"]
    assert all(t.recipe for t in on_gpu.tensors)
    on_cpu = verify(case.base_dir, [case.adapter_dir], out_cuda, device="cpu")
    for g, c in zip(on_gpu.tensors, on_cpu.tensors):
        assert g.name == c.name and g.verdict == c.verdict
        assert g.strength == pytest.approx(c.strength, rel=1e-9) and g.worst_ulps == pytest.approx(c.worst_ulps, rel=1e-6)
    assert verify(case.base_dir, [case.adapter_dir], out_cpu, device="cuda").equivalent
    base = load_file(case.base_dir / "model.safetensors")
    merged = load_file(out_cuda / "model.safetensors")
    half = {k: ((v.double() + base[k].double()) / 2).to(v.dtype) if not torch.equal(v, base[k]) else v for k, v in merged.items()}
    from safetensors.torch import save_file

    save_file(half, out_cuda / "model.safetensors", metadata={"format": "pt"})
    assert not verify(case.base_dir, [case.adapter_dir], out_cuda, device="cuda").equivalent
