"""Benchmark `lora-tools extract`: time and peak memory from a tiny to a 1B-shaped pair,
against mergekit's extractor when one is given.

BASE is synthetic's Llama checkpoint (bf16); TUNED is BASE plus a random rank-64 update on
every projection and small dense noise (so the difference is full rank), written shard by
shard with the same layout. Then, in one run, per shape:

  lora-tools extract BASE TUNED --rank 32 -o OUT --json -q     wall, peak RSS and anonymous memory
  mergekit-extract-lora (--mergekit PATH) --max-rank 32         the peer, same pair, same rank

Peak anonymous memory is reported against the largest tensor (stored bytes): the target is
≤ 3× on a 1B pair, and flat from tiny to 1B. The speed target is ≥ 5× mergekit.

    PYTHONPATH=. python3 benchmarks/bench_extract.py [--shapes tiny 1b] [--mergekit PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402

RANK = 32
TRUE_RANK = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_tuned(base: Path, out: Path, seed: int = 3) -> dict[str, Any]:
    """BASE + U·V (rank 64, ~5 % of the weights' size) + 0.1 % dense noise on every projection."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for item in base.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, out / item.name)
            continue
        tensors = load_file(str(item))
        for name, weight in tensors.items():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS:
                rows, cols = weight.shape
                u = torch.randn(rows, TRUE_RANK, generator=generator) * (0.05 * 0.02 / TRUE_RANK**0.5)
                v = torch.randn(TRUE_RANK, cols, generator=generator)
                noise = torch.randn(rows, cols, generator=generator) * (0.001 * 0.02)
                tensors[name] = (weight.float() + u @ v + noise).to(weight.dtype)
                changed += 1
        save_file(tensors, str(out / item.name), metadata={"format": "pt"})
    return {"changed": changed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser, shapes=None)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "1b"])
    parser.add_argument("--mergekit", type=Path, default=None, help="the mergekit-extract-lora executable")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"benchmark": "extract", "command": bu.command_line(), "machine": bu.machine_info()}
    rows = []
    with bu.workdir(args.workdir, args.keep, "lora-bench-extract-") as work:
        for shape in args.shapes:
            spec = synthetic.get_shape(shape)
            base, tuned = work / f"base-{shape}", work / f"tuned-{shape}"
            info = bu.cached(base, {"shape": shape, "seed": 0}, lambda p: synthetic.write_base(p, spec))
            bu.cached(tuned, {"shape": shape, "seed": 3, "rank": TRUE_RANK}, lambda p: write_tuned(base, p))
            out = work / f"out-{shape}"
            if out.exists():
                shutil.rmtree(out)
            run = bu.measure(bu.lora_tools("extract", base, tuned, "--rank", RANK, "-o", out, "--json", "-q"), check=True)
            report = json.loads(run.stdout)
            largest_mb = info["largest_tensor_bytes"] / 2**20
            anon = run.peak_anon_mb or float("nan")
            rows.append([f"lora-tools extract ({shape}, {report['n_layers']} layers)", run.wall_s, bu.fmt(run.peak_mb),
                         bu.fmt(anon), f"{anon / largest_mb:.2f}", f"{report['relative_error']:.3g}"])
            results[shape] = {"wall_s": run.wall_s, "peak_rss_mb": run.peak_mb, "peak_anon_mb": anon,
                              "largest_tensor_mb": largest_mb, "relative_error": report["relative_error"]}
            print(f"{shape}: {run.wall_s:.2f} s, peak RSS {bu.fmt(run.peak_mb)} MB, largest tensor {largest_mb:.0f} MB",
                  flush=True)
            if args.mergekit is not None:
                peer_out = work / f"mergekit-{shape}"
                if peer_out.exists():
                    shutil.rmtree(peer_out)
                peer = bu.measure([str(args.mergekit), "--model", tuned, "--base-model", base, "--out-path", peer_out,
                                   "--max-rank", str(RANK)])
                rows.append([f"mergekit-extract-lora ({shape})", peer.wall_s, bu.fmt(peer.peak_mb), "", "",
                             "" if peer.rc == 0 else f"exit {peer.rc}"])
                results[shape]["mergekit_wall_s"] = peer.wall_s
        print()
        print(bu.table(["variant", "seconds", "peak RSS MB", "peak anon MB", "anon × largest tensor", "rel. error"], rows,
                       title=f"extract --rank {RANK}: TUNED = BASE + rank-{TRUE_RANK} update + dense noise"))
        bu.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
