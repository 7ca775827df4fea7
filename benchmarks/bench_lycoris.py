"""Benchmark `lora-tools inspect` on LyCORIS LoHa and LoKr files with SDXL-UNet-like shapes.

The files are generated here with LyCORIS' key names and layouts (`lora_unet_…` prefixes,
`hada_w1_a` (out, r), `hada_w1_b` (r, in), …; LoKr with a full W1 and a factored W2):
70 transformer blocks (10 at width 640, 60 at 1280, as in SDXL's UNet), 10 projections
each (self-attention q/k/v/out, cross-attention q/k/v/out with 2048-wide context, the
GEGLU up projection and the down projection): 700 modules. Then, in one run:

  python -c pass                                  interpreter start-up
  lora-tools inspect FILE --json, inspect FILE    wall time of each, --repeat runs taken in
                                                  turns (noise hits both alike); min and median
  dense baseline                                  ΔW formed densely (LyCORIS' rebuild) and
                                                  torch.linalg.svdvals in float32, per module,
                                                  timed on --per-type modules per shape and
                                                  extrapolated, as bench_inspect does for LoRA

Accuracy: on the timed modules, σ from inspect against float64 numpy SVD of the dense ΔW,
max |Δσ|/σ₁. Targets: inspect ≤ 1 s wall on the 2-core box, ≥ 100× faster than dense.

    PYTHONPATH=. python3 benchmarks/bench_lycoris.py [--dim 8] [--repeat 3] [--per-type 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

TARGET_WALL_S = 1.0
TARGET_SPEEDUP = 100.0
CONTEXT = 2048


def sdxl_like_modules() -> list[tuple[str, int, int]]:
    """(kohya name, out, in) of 700 UNet projections with SDXL's widths."""
    modules = []
    widths = [640] * 10 + [1280] * 60
    for block, width in enumerate(widths):
        stem = f"lora_unet_block_{block}_transformer_blocks_0"
        for attn in ("attn1", "attn2"):
            context = width if attn == "attn1" else CONTEXT
            modules += [(f"{stem}_{attn}_to_q", width, width), (f"{stem}_{attn}_to_k", width, context),
                        (f"{stem}_{attn}_to_v", width, context), (f"{stem}_{attn}_to_out_0", width, width)]
        modules += [(f"{stem}_ff_net_0_proj", 8 * width, width), (f"{stem}_ff_net_2", width, 4 * width)]
    return modules


def _split(n: int) -> tuple[int, int]:
    """LyCORIS' `factorization(n, -1)`: the pair closest to √n, smaller first."""
    best = (1, n)
    for a in range(1, int(n**0.5) + 1):
        if n % a == 0:
            best = (a, n // a)
    return best


def write_file(path: Path, algo: str, dim: int, seed: int = 0) -> dict[str, Any]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, out, inp in sdxl_like_modules():
        g = lambda *shape: np.asarray(rng.standard_normal(shape) * 0.05, dtype=np.float32)  # noqa: E731
        if algo == "loha":
            tensors |= {f"{name}.hada_w1_a": g(out, dim), f"{name}.hada_w1_b": g(dim, inp),
                        f"{name}.hada_w2_a": g(out, dim), f"{name}.hada_w2_b": g(dim, inp)}
        else:
            (o1, o2), (i1, i2) = _split(out), _split(inp)
            tensors |= {f"{name}.lokr_w1": g(o1, i1), f"{name}.lokr_w2_a": g(o2, dim), f"{name}.lokr_w2_b": g(dim, i2)}
        tensors[f"{name}.alpha"] = np.asarray(dim / 2, dtype=np.float32)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo})})
    return {"modules": len(sdxl_like_modules()), "bytes": path.stat().st_size}


def dense_delta(tensors: dict[str, Any], name: str, algo: str) -> Any:
    """ΔW as LyCORIS rebuilds it (torch, float32): the Hadamard or Kronecker product."""
    import torch

    scale = float(tensors[f"{name}.alpha"]) / (tensors[f"{name}.hada_w1_b"].shape[0] if algo == "loha"
                                              else tensors[f"{name}.lokr_w2_b"].shape[0])
    if algo == "loha":
        w1 = tensors[f"{name}.hada_w1_a"] @ tensors[f"{name}.hada_w1_b"]
        w2 = tensors[f"{name}.hada_w2_a"] @ tensors[f"{name}.hada_w2_b"]
        return w1 * w2 * scale
    return torch.kron(tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2_a"] @ tensors[f"{name}.lokr_w2_b"]) * scale


def main(argv: list[str] | None = None) -> int:
    import torch
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser, shapes=None)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-type", type=int, default=1, help="dense SVDs timed per module shape")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"benchmark": "lycoris-inspect", "command": bu.command_line(), "machine": bu.machine_info(),
                               "dim": args.dim}
    worst_ratio, worst_wall = float("inf"), 0.0
    with bu.workdir(args.workdir, args.keep, "lora-bench-lycoris-") as work:
        floor, _ = bu.best_of([sys.executable, "-c", "pass"], args.repeat)
        for algo in ("loha", "lokr"):
            path = work / f"{algo}-sdxl-dim{args.dim}.safetensors"
            info = write_file(path, algo, args.dim)
            bu.sync_seconds()  # the new file's write-back would compete with the timed runs
            walls: dict[str, list[float]] = {"json": [], "table": []}
            stdout = ""
            for _ in range(args.repeat):
                for mode, extra in (("json", ["--json"]), ("table", [])):
                    run = bu.measure(bu.lora_tools("inspect", str(path), *extra))
                    if run.rc != 0:
                        raise RuntimeError(f"exit status {run.rc}: {' '.join(run.cmd)}\n{run.stderr[-4000:]}")
                    walls[mode].append(run.wall_s)
                    if mode == "json":
                        stdout = run.stdout
            best_json, best_table = min(walls["json"]), min(walls["table"])
            report = {layer["name"]: layer for layer in json.loads(stdout)["layers"]}
            tensors = load_file(str(path))
            by_shape: dict[tuple[int, int], list[float]] = {}
            counts: dict[tuple[int, int], int] = {}
            accuracy = 0.0
            for name, out, inp in sdxl_like_modules():
                counts[(out, inp)] = counts.get((out, inp), 0) + 1
                if len(by_shape.setdefault((out, inp), [])) >= args.per_type:
                    continue
                started = time.perf_counter()
                sigma32 = torch.linalg.svdvals(dense_delta(tensors, name, algo))
                by_shape[(out, inp)].append(time.perf_counter() - started)
                del sigma32
                sigma = np.linalg.svd(dense_delta(tensors, name, algo).double().numpy(), compute_uv=False)
                ours = np.asarray(report[name]["singular_values"])
                k = min(len(ours), len(sigma))
                accuracy = max(accuracy, float(np.max(np.abs(ours[:k] - sigma[:k])) / sigma[0]))
            dense_total = sum(min(times) * counts[shape] for shape, times in by_shape.items())
            ratio = dense_total / best_json
            worst_ratio, worst_wall = min(worst_ratio, ratio), max(worst_wall, best_json, best_table)
            rows: list[list[Any]] = [
                ["python -c pass", floor.wall_s, None, floor.wall_s / best_json],
                [f"lora-tools inspect --json ({info['modules']} {algo} modules)", best_json,
                 statistics.median(walls["json"]), 1.0],
                ["lora-tools inspect (table)", best_table, statistics.median(walls["table"]), best_table / best_json],
                ["dense ΔW + torch svdvals (fp32), extrapolated", dense_total, None, ratio]]
            print(bu.table(["variant", "seconds (min)", "median", "× inspect --json"], rows,
                           title=f"inspect: {algo}, SDXL-like shapes, dim {args.dim}, {info['bytes'] / 1e6:.0f} MB"))
            print(f"max |σ_ours − σ_fp64|/σ₁ on the timed modules: {accuracy:.1e}; wall runs --json "
                  f"{', '.join(f'{w:.2f}' for w in walls['json'])}; table {', '.join(f'{w:.2f}' for w in walls['table'])}\n")
            results[algo] = {"inspect_wall_s": best_json, "inspect_table_wall_s": best_table, "walls": walls,
                             "dense_s": dense_total, "speedup": ratio, "accuracy": accuracy, **info}
        print(f"slowest inspect {worst_wall:.2f} s (target ≤ {TARGET_WALL_S} s), smallest speed-up {worst_ratio:.0f}× "
              f"(target ≥ {TARGET_SPEEDUP:.0f}×)")
        bu.write_json(args.json_out, results)
    return 0 if worst_wall <= TARGET_WALL_S and worst_ratio >= TARGET_SPEEDUP else 1


if __name__ == "__main__":
    raise SystemExit(main())
