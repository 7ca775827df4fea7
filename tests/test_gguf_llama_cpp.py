"""Real-client proof of the GGUF LoRA writer: llama.cpp itself merges what we write.

For each case a tiny HF Llama base (random weights, GQA: 4 heads, 2 kv heads) gets a real
PEFT LoRA (init_lora_weights=False, so B != 0). Then
  expected = llama.cpp's convert_hf_to_gguf.py (F32) of PEFT's own merge_and_unload()
  actual   = llama-export-lora -m <convert_hf_to_gguf.py of the base> --lora <ours>
where <ours> is `lora_tools.formats.gguf.write_gguf_adapter` of `load_adapter(adapter)`.
Both sides go through llama.cpp's own converter, so the q/k RoPE row permutation and
every layout are llama.cpp's, not ours. Every tensor of the two files is compared: the
merged ones to float32 rounding (see TOL), the copied ones bit for bit.

llama-export-lora (tools/export-lora/export-lora.cpp `merge_tensor`) computes, in F32,
  W + scale · (lora_b · lora_a),  scale = user_scale · alpha / r  (alpha != 0)
with alpha the file's single `adapter.lora.alpha` and r = lora_b.ne[0], the same scale
the runtime uses (src/llama-adapter.h `llama_adapter_lora_weight::get_scale`, applied in
src/llama-graph.cpp `build_lora_mm`). So per-layer scales (rsLoRA, alpha/rank patterns)
exist in a GGUF adapter only if folded into the factors, which is what the writer does.

`test_llama_cpp_converter` is the control experiment: llama.cpp's own
convert_lora_to_gguf.py writes the config's lora_alpha and ignores use_rslora and
alpha_pattern, so its plain adapter merges like PEFT and its rsLoRA one merges with
alpha/r instead of alpha/√r (exactly half the update at r = 4).

Slow (marked): the first run fetches the llama-cpp-python sdist with pip and builds
llama-export-lora (minutes; cached afterwards, see tests/llama_cpp_tools.py). A failure
to fetch or build FAILS the test; nothing here skips.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp_tools as lct
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT LoraConfig kwargs per case (r=4, lora_alpha=8 unless overridden).
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {
        "rank_pattern": {"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"k_proj": 3, "model.layers.0.mlp.up_proj": 16, "model.layers.1.self_attn.o_proj": 5},
    },
    # token_embd takes export-lora's separate embedding branch; lm_head maps to output.weight.
    "embedding": {"target_modules": [*TARGETS, "embed_tokens", "lm_head"]},
}
# Merged tensors must match to this fraction of the tensor's largest |value|: F32 has
# eps 1.19e-7, and each element of B·A here is a sum of <= 6 products plus one add, so
# honest differences are a few ulp; any wrong scale, permutation or orientation is >= 1e-2.
TOL = 1e-6


def fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- fixtures


@dataclass
class Case:
    name: str
    adapter: Path  # PEFT adapter folder
    merged_gguf: Path  # convert_hf_to_gguf of PEFT's merge_and_unload()
    llama_cpp_lora: Path  # convert_lora_to_gguf of the adapter (the control)


@dataclass
class Workspace:
    root: Path
    base: Path  # HF folder
    base_gguf: Path
    cases: dict[str, Case]


def _build_base(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = root / "base"
    vocab = lct.write_tiny_llama_tokenizer(base)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with _seeded(0):
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # same order of magnitude as the LoRA updates
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(base)
    return base


def _build_case(name: str, base: Path, root: Path) -> tuple[Path, Path]:
    """(PEFT adapter folder, merge_and_unload() folder with the base's tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, "lora_dropout": 0.0}
    kwargs.update(CASES[name])
    with _seeded(1):
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(**kwargs))
    adapter, merged = root / name / "adapter", root / name / "merged"
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / file, merged / file)
    return adapter, merged


@pytest.fixture(scope="module")
def workspace_or_error(tmp_path_factory: pytest.TempPathFactory) -> Workspace | str:
    """Everything the tests share, built once; or why llama.cpp is unusable (a string, so
    that each test FAILS with it, instead of erroring in setup or skipping)."""
    try:
        lct.export_lora_binary()
    except lct.LlamaCppUnavailable as exc:
        return f"llama.cpp (llama-cpp-python {lct.LLAMA_CPP_PYTHON_VERSION} sdist) could not be fetched or built:\n{exc}"
    root = tmp_path_factory.mktemp("gguf_llama_cpp")
    base = _build_base(root)
    cases: dict[str, Case] = {}
    jobs: list[list[str | os.PathLike[str]]] = [lct.convert_hf_to_gguf_job(base, root / "base.gguf")]
    for name in CASES:
        adapter, merged = _build_case(name, base, root)
        case = Case(name, adapter, root / name / "peft-merged.gguf", root / name / "llama-cpp-converter-lora.gguf")
        jobs.append(lct.convert_hf_to_gguf_job(merged, case.merged_gguf))
        jobs.append(lct.convert_lora_to_gguf_job(adapter, base, case.llama_cpp_lora))
        cases[name] = case
    try:
        lct.run_converters(jobs)  # all 9 conversions in one interpreter: torch, transformers imported once
    except lct.LlamaCppUnavailable as exc:
        return f"llama.cpp's converter failed:\n{exc}"
    return Workspace(root, base, root / "base.gguf", cases)


def ready(workspace_or_error: Workspace | str) -> Workspace:
    """The workspace, or FAIL the calling test (in its body: reported as FAILED, not ERROR)."""
    if isinstance(workspace_or_error, str):
        fail(workspace_or_error)
    assert isinstance(workspace_or_error, Workspace)
    return workspace_or_error


# --------------------------------------------------------------------------- helpers


def read_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            fail(f"{path.name}: {tensor.name} is {tensor.tensor_type.name}, expected F32 throughout")
        out[tensor.name] = np.array(tensor.data, dtype=np.float64).reshape([int(n) for n in reversed(tensor.shape)])
    return out


@dataclass
class Diff:
    name: str
    merged: bool  # the tensor got a LoRA update
    max_abs: float  # max |actual - expected|
    rel: float  # max_abs / max |expected|
    delta: float  # max |expected - base|: how big the LoRA update is
    peak: float  # max |expected|


def compare(actual_path: Path, expected_path: Path, base_path: Path) -> list[Diff]:
    actual, expected, base = read_gguf(actual_path), read_gguf(expected_path), read_gguf(base_path)
    if sorted(actual) != sorted(expected):
        fail(f"tensor sets differ: only in {actual_path.name}: {sorted(set(actual) - set(expected))}, "
             f"only in {expected_path.name}: {sorted(set(expected) - set(actual))}")
    diffs = []
    for name in sorted(expected):
        a, e, b = actual[name], expected[name], base[name]
        if a.shape != e.shape:
            fail(f"{name}: shape {a.shape} != expected {e.shape}")
        max_abs = float(np.max(np.abs(a - e)))
        peak = float(np.max(np.abs(e)))
        diffs.append(Diff(name, not np.array_equal(e, b), max_abs, max_abs / peak, float(np.max(np.abs(e - b))), peak))
    return diffs


def report(title: str, diffs: list[Diff]) -> str:
    merged = [d for d in diffs if d.merged]
    lines = [f"{title}: {len(merged)} merged tensors, {len(diffs) - len(merged)} copied"]
    for d in merged:
        lines.append(f"  {d.name:28s} max|diff| {d.max_abs:.3e}  rel {d.rel:.3e}  (max|update| {d.delta:.3e})")
    if merged:
        worst = max(merged, key=lambda d: d.rel)
        lines.append(f"  worst: {worst.name} rel {worst.rel:.3e}, max|diff| overall {max(d.max_abs for d in merged):.3e}")
    return "\n".join(lines)


def write_ours(case: Case, base: Path, out: Path) -> Any:
    from lora_tools.formats import load_adapter
    from lora_tools.formats.gguf import write_gguf_adapter

    base_config = json.loads((base / "config.json").read_text())
    return write_gguf_adapter(load_adapter(case.adapter).layers, out, base_config=base_config)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case_name", list(CASES))
def test_writer_merges_like_peft(case_name: str, workspace_or_error: Workspace | str, tmp_path: Path, record_property: Any) -> None:
    workspace = ready(workspace_or_error)
    case = workspace.cases[case_name]
    ours = tmp_path / "ours.gguf"
    written = write_ours(case, workspace.base, ours)
    merged = tmp_path / "ours-merged.gguf"
    try:
        log = lct.export_lora(workspace.base_gguf, [ours], merged)
    except lct.LlamaCppUnavailable as exc:
        fail(f"llama-export-lora refused our adapter:\n{exc}")
    diffs = compare(merged, case.merged_gguf, workspace.base_gguf)
    text = report(f"[{case_name}] ours (alpha {written.alpha}, folded {written.folded}) vs PEFT merge_and_unload", diffs)
    print(text)
    record_property("diffs", text)

    assert f"merged {len(written.names)} tensors" in log, log[-2000:]
    assert sorted(d.name for d in diffs if d.merged) == sorted(written.names.values())
    for d in diffs:
        if not d.merged:
            assert d.max_abs == 0.0, f"{d.name}: a copied tensor changed by {d.max_abs}"
        else:
            assert d.delta > 1e3 * TOL * d.peak, f"{d.name}: the LoRA update is too small for this test to see"
            assert d.rel <= TOL, text


def test_llama_cpp_converter(workspace_or_error: Workspace | str, tmp_path: Path, record_property: Any) -> None:
    """Control: llama.cpp's own convert_lora_to_gguf.py, merged by llama-export-lora.

    plain matches PEFT; rsLoRA gets alpha/r, not alpha/√r (half the update at r = 4);
    patterns: rank_pattern is fine (r comes from the tensors), alpha_pattern is ignored.
    """
    workspace = ready(workspace_or_error)
    texts = []
    outcome: dict[str, dict[str, float]] = {}
    for name, case in workspace.cases.items():
        merged = tmp_path / f"{name}-merged.gguf"
        try:
            lct.export_lora(workspace.base_gguf, [case.llama_cpp_lora], merged)
        except lct.LlamaCppUnavailable as exc:
            fail(f"llama-export-lora on llama.cpp's own conversion ({name}):\n{exc}")
        diffs = compare(merged, case.merged_gguf, workspace.base_gguf)
        texts.append(report(f"[{name}] llama.cpp convert_lora_to_gguf.py vs PEFT merge_and_unload", diffs))
        outcome[name] = {d.name: d.rel for d in diffs if d.merged}
        if name == "rslora":  # llama.cpp applied alpha/r = 2 where PEFT applied alpha/sqrt(r) = 4
            actual, expected, base = read_gguf(merged), read_gguf(case.merged_gguf), read_gguf(workspace.base_gguf)
            for t in outcome[name]:
                half = base[t] + (expected[t] - base[t]) / 2
                assert np.max(np.abs(actual[t] - half)) <= TOL * np.max(np.abs(half)), t
    text = "\n".join(texts)
    print(text)
    record_property("diffs", text)

    assert max(outcome["plain"].values()) <= TOL, text
    assert max(outcome["embedding"].values()) <= TOL, text
    assert min(outcome["rslora"].values()) > 1e-2, text  # every layer off
    patterns = outcome["patterns"]
    off = {t for t, rel in patterns.items() if rel > TOL}
    assert off == {"blk.0.attn_k.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight", "blk.1.attn_output.weight"}, text
