"""Benchmark: `lora-tools blend --method svd` against PEFT's add_weighted_adapter(svd).

Two random adapters with Llama-3.2-1B shapes (hidden 2048, 16 layers, intermediate 8192,
8 kv heads so k/v_proj are 512×2048), r = 16 (alpha 32) and r = 8 (alpha 16) on all
seven projections, fp32 safetensors, seeded; their factors get a decaying spectrum
(0.85^j per rank direction) as trained adapters have.

1. `lora-tools blend A B --weight 0.5 --method svd --rank 16 -o OUT` as a subprocess:
   wall time including interpreter start-up, reading and writing (best and median of runs).
2. PEFT's add_weighted_adapter(["a", "b"], [0.5, 0.5], combination_type="svd",
   svd_rank=16) (its default full_matrices=True) on a LlamaForCausalLM with the same
   shapes. PEFT needs a real model and a dense SVD per module, so only --peft-layers
   decoder layers (7 modules each) are built and timed, and the time is multiplied by
   16 / --peft-layers: every decoder layer has the same shapes, so the cost is linear.
3. Residuals ‖ΔW − ΔW_R‖_F of both results against the exact blend, next to the
   Eckart–Young optimum from a dense float64 SVD, for the modules of decoder layer 0.

Usage: python benchmarks/bench_blend.py [--runs 5] [--peft-layers 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, INTER, KV, LAYERS, VOCAB = 2048, 8192, 512, 16, 256  # vocab: not adapted, kept small
MODULES = {  # name -> (path in block, out, in)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", KV, HIDDEN),
    "v_proj": ("self_attn", KV, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", INTER, HIDDEN),
    "up_proj": ("mlp", INTER, HIDDEN),
    "down_proj": ("mlp", HIDDEN, INTER),
}
RANK = 16


def module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{MODULES[name][0]}.{name}"


def make_adapter(folder: Path, r: int, alpha: float, seed: int, layers: range = range(LAYERS)) -> None:
    """A PEFT adapter folder with random factors whose rank directions decay 0.85^j."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    decay = (0.85 ** np.arange(r)).astype(np.float32)
    tensors = {}
    for layer in layers:
        for name, (_, out_dim, in_dim) in MODULES.items():
            key = f"base_model.model.{module_path(layer, name)}"
            a = rng.standard_normal((r, in_dim), dtype=np.float32) / np.float32(np.sqrt(in_dim))
            b = rng.standard_normal((out_dim, r), dtype=np.float32) * np.float32(0.02) * decay
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = b
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(MODULES),
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B", "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def time_lora_tools(a: Path, b: Path, out: Path, runs: int) -> list[float]:
    exe = shutil.which("lora-tools", path=str(Path(sys.executable).parent)) or "lora-tools"
    cmd = [exe, "blend", str(a), str(b), "--weight", "0.5", "--method", "svd", "--rank", str(RANK), "-o", str(out), "--force", "--json"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"lora-tools failed: {done.stderr}")
    return times


def factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """module path -> (B, A, scale) read with safetensors' own numpy reader."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
            out[module] = (b.astype(np.float64), a.astype(np.float64), alpha / r)
    return out


def time_peft(a: Path, b: Path, n_layers: int, work: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Seconds of add_weighted_adapter(svd) on n_layers decoder layers, and its factors."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")
    subsets = []
    for src, name in ((a, "a"), (b, "b")):  # the same adapters, cut to the layers built
        from safetensors.numpy import load_file, save_file

        dst = work / f"peft-{name}"
        dst.mkdir()
        keep = {f"model.layers.{i}." for i in range(n_layers)}
        tensors = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if any(p in k for p in keep)}
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
        subsets.append(dst)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=n_layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=VOCAB, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()  # base values are never used
    peft_model = PeftModel.from_pretrained(model, subsets[0], adapter_name="a")
    peft_model.load_adapter(subsets[1], adapter_name="b")
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    peft_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=RANK)
    seconds = time.perf_counter() - start
    result = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            scale = module.scaling["mix"]
            result[name] = (module.lora_B["mix"].weight.detach().double().numpy() * scale,
                            module.lora_A["mix"].weight.detach().double().numpy())
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--peft-layers", type=int, default=1, help="decoder layers PEFT is timed on (then ×16/n)")
    parser.add_argument("--keep", type=Path, default=None, help="generate into this folder and keep it")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-blend-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        a, b, out = work / "adapter-r16", work / "adapter-r8", work / "blend-svd16"
        if not a.exists():
            make_adapter(a, 16, 32, seed=1)
            make_adapter(b, 8, 16, seed=2)
        ours = time_lora_tools(a, b, out, args.runs)
        peft_seconds, peft_factors = time_peft(a, b, args.peft_layers, Path(tempfile.mkdtemp(dir=work)))
        peft_total = peft_seconds * LAYERS / args.peft_layers

        fa, fb, fo = factors(a), factors(b), factors(out)
        rows = []
        for name in MODULES:
            module = module_path(0, name)
            (ba, aa, sa), (bb, ab, sb) = fa[module], fb[module]
            exact = 0.5 * sa * (ba @ aa) + 0.5 * sb * (bb @ ab)  # (out, in) float64
            sigma = np.linalg.svd(exact, compute_uv=False)
            optimum = float(np.sqrt(np.sum(sigma[RANK:] ** 2)))
            bo, ao, so = fo[module]
            ours_res = float(np.linalg.norm(exact - so * (bo @ ao)))
            bp, ap = peft_factors[module]
            peft_res = float(np.linalg.norm(exact - bp @ ap))
            rows.append((name, exact.shape, optimum, ours_res, peft_res))

        print(f"# bench_blend  {time.strftime('%Y-%m-%d')}  {platform.machine()}  {os.cpu_count()} CPUs  "
              f"python {platform.python_version()}  numpy {np.__version__}")
        print(f"lora-tools blend --method svd --rank {RANK} (subprocess, wall, {args.runs} runs): "
              f"best {min(ours):.3f} s, median {statistics.median(ours):.3f} s")
        print(f"PEFT add_weighted_adapter(svd, svd_rank={RANK}): {peft_seconds:.1f} s for {args.peft_layers} decoder "
              f"layer(s) x {LAYERS // args.peft_layers} = {peft_total:.0f} s for {LAYERS} layers (extrapolated)")
        print(f"speed-up (PEFT extrapolated / lora-tools median): {peft_total / statistics.median(ours):.0f}x")
        print()
        print("Residuals ‖ΔW − ΔW_16‖_F against the exact blend 0.5·ΔA + 0.5·ΔB (dense float64), both results as stored (fp32):")
        print()
        print("| module (layer 0) | shape | Eckart-Young optimum | lora-tools / optimum − 1 | PEFT / optimum − 1 |")
        print("| --- | --- | --- | --- | --- |")
        for name, shape, optimum, ours_res, peft_res in rows:
            print(f"| {name} | {shape[0]}x{shape[1]} | {optimum:.6e} | {ours_res / optimum - 1:+.2e} | {peft_res / optimum - 1:+.2e} |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
