"""Benchmark merges into an FP8 base against the bf16 merge of the same model.

The synthetic Llama of bench_merge (1B shapes by default, bf16) is converted to a
DeepSeek-style block-FP8 checkpoint: every projection in e4m3 with a float32
`weight_scale_inv` per 128×128 block (transformers' `Fp8Quantize` rule, through
`lora_tools.io.fp8.requantize`, which equals it bit for bit: tests/test_fp8.py), the
embedding, head and norms in bf16, `quantization_config` in config.json. Then, in one
run, interleaved for --repeat rounds (medians):

  bf16 base               lora-tools merge BF16BASE ADAPTER -o OUT --device cpu -q
  fp8 base -> bf16        lora-tools merge FP8BASE ADAPTER -o OUT --device cpu -q
  fp8 base -> fp8         the same with --dtype fp8 (fresh scales, survival measured)

Each variant starts after a read of its base (warm page cache) and a sync; wall+sync
charges the flush of its output. "× bf16" is the median over rounds of the paired ratio
to the bf16 merge of the same round. Memory: peak RSS and anonymous memory, polled.

    PYTHONPATH=. python3 benchmarks/bench_fp8.py [--shape 1b|tiny] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402
from bench_merge import prepare_inputs, run_variant  # noqa: E402

BLOCK = (128, 128)


def write_fp8_base(src: Path, out: Path) -> dict[str, Any]:
    """`src` (a bf16 synthetic Llama folder) with every projection quantized to block FP8."""
    import torch
    from safetensors.torch import load_file, save_file

    from lora_tools.io.fp8 import ScaleRule, requantize

    out.mkdir(parents=True)
    index_path = src / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) if index_path.exists() else ["model.safetensors"]
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        for name, value in load_file(src / shard).items():
            if name.endswith("_proj.weight"):
                codes, scales = requantize(value.float(), BLOCK, torch.float8_e4m3fn, torch.float32, ScaleRule(True))
                tensors[name], tensors[name + "_scale_inv"] = codes, scales
            else:
                tensors[name] = value
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if index_path.exists():
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"total_bytes": total, "shards": sorted(set(weight_map.values()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser, shapes=("tiny", "1b"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    spec = synthetic.get_shape(args.shape)
    results: dict[str, Any] = {"benchmark": "fp8 merge", "command": bu.command_line(), "machine": bu.machine_info(),
                               "shape": spec.name}
    with bu.workdir(args.workdir, args.keep, "lora-bench-fp8-") as work:
        base, adapter, base_info, _ = prepare_inputs(work, spec.name, "bf16", args.rank, synthetic.DEFAULT_SHARD_BYTES)
        fp8_base = work / f"base-{spec.name}-fp8"
        fp8_info = bu.cached(fp8_base, {"from": base.name, "block": list(BLOCK)}, lambda p: write_fp8_base(base, p))
        print(f"fp8 base {fp8_base}: {fp8_info['total_bytes'] / 1e9:.2f} GB")
        variants = [
            ("bf16 base -> bf16", base, []),
            ("fp8 base -> bf16", fp8_base, []),
            ("fp8 base -> fp8 (fresh scales)", fp8_base, ["--dtype", "fp8"]),
        ]
        runs: list[dict[str, Any]] = []
        for round_index in range(args.repeat):
            print(f"round {round_index + 1} of {args.repeat}")
            for label, source, extra in variants:
                out = work / "out"
                bu.remove(out, keep=False)
                run = run_variant(label, bu.lora_tools("merge", source, adapter, "-o", out, "--device", "cpu", "-q", *extra),
                                  source, timeout_s=args.timeout)
                run["round"] = round_index
                runs.append(run)
                bu.remove(out, keep=False)
        reference = {r["round"]: r["wall_sync_s"] for r in runs if r["variant"] == variants[0][0] and r["rc"] == 0}
        rows = []
        for label, _, _ in variants:
            ok = [r for r in runs if r["variant"] == label and r["rc"] == 0]
            if not ok:
                rows.append([label, 0, None, None, None, None, None])
                continue
            ratios = [r["wall_sync_s"] / reference[r["round"]] for r in ok if r["round"] in reference]
            rows.append([label, len(ok), statistics.median(r["wall_s"] for r in ok),
                         statistics.median(r["wall_sync_s"] for r in ok), statistics.median(ratios) if ratios else None,
                         max(r["peak_mb"] for r in ok if r["peak_mb"]), max(r["peak_anon_mb"] for r in ok if r["peak_anon_mb"])])
        title = (f"FP8 merge: {spec.name} shapes, bf16 base {base_info['total_bytes'] / 1e9:.2f} GB, FP8 base "
                 f"{fp8_info['total_bytes'] / 1e9:.2f} GB (128×128 blocks), adapter r={args.rank}; {args.repeat} round(s)")
        print()
        print(bu.table(["variant", "runs", "wall s", "wall+sync s", "× bf16", "peak RSS MB", "peak anon MB"], rows, title=title))
        results["runs"], results["rows"] = runs, rows
        bu.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
