"""Benchmark `lora-tools merge` against an I/O floor and PEFT, and check it against PEFT.

A synthetic Llama checkpoint (1B shapes by default, bf16, ≤ 1 GB shards) and a PEFT
adapter (r=16 on all seven projections of every layer) are generated, then each
variant runs in its own subprocess:

  floor: safetensors      per shard: safetensors.torch.load_file, then save_file into a
                          new folder (read every tensor once, write it once)
  floor, durable          the same, then fsync of every output file and the folder, timed
                          (lora-tools fsyncs before its rename: the fair floor does too)
  cp -r                   a plain byte copy of the folder, for scale
  lora-tools merge cpu    python -m lora_tools merge BASE ADAPTER -o OUT --device cpu -q
  lora-tools merge cuda   the same with --device cuda (only when torch sees a GPU), and
                          once a process with only torch, CUDA, cuBLAS and 32 MB pinned
                          (the host memory floor of any CUDA merge)
  PEFT                    AutoModelForCausalLM.from_pretrained(BASE, bf16) →
                          PeftModel.from_pretrained → merge_and_unload → save_pretrained
                          (max_shard_size as the base's)

Fairness: before every variant the base shards are read once (warm page cache for all),
and pending writes are flushed with sync; after it, sync is timed again, so the
"wall+sync" column charges every variant for getting its output onto the disk (lora-tools
fsyncs its shards itself; save_file and save_pretrained do not). Memory is polled from
/proc/<pid>/status every 20 ms (VmRSS, RssAnon; VmHWM and wait4's ru_maxrss as kernel
cross-checks). "anon / largest" is peak anonymous memory over the largest tensor (the
embedding: 128256×2048 bf16 = 525 MB at 1B): a streaming merge should stay at a few.

Correctness: a few adapted tensors of lora-tools' output are compared with PEFT's (and
both with a float64 W0 + s·B·A), in units of the bf16 spacing at each element; a few
unadapted tensors must be bit-identical.

    PYTHONPATH=. python3 benchmarks/bench_merge.py                 # 1B, CPU (+ CUDA if present)
    PYTHONPATH=. python3 benchmarks/bench_merge.py --shape 8b --skip-peft
    PYTHONPATH=. python3 benchmarks/bench_merge.py --flatness --skip-peft   # peak memory 1B vs 8B
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402

FLOOR_SCRIPT = textwrap.dedent('''
    import os, sys
    from safetensors.torch import load_file, save_file
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(src, name))
            save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
            del tensors
''')

# The durable floor: the same, and every output file fsynced (and the folder) inside the
# timed part, as lora-tools does before it publishes OUT: a merge must be on the disk
# before it is renamed into place, and the floor a merge is held to must pay that too.
DURABLE_FLOOR_SCRIPT = FLOOR_SCRIPT + textwrap.dedent('''
    for name in sorted(os.listdir(dst)):
        fd = os.open(os.path.join(dst, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
''')
DURABLE_FLOOR = "floor, durable: load_file+save_file+fsync"

# The host memory any CUDA merge pays before doing anything of its own: the interpreter,
# torch, the CUDA context and cuBLAS (one small matmul of the merge's kind), and the same
# 32 MB of pinned memory lora-tools stages through. lora-tools' own share on a GPU is its
# peak RSS minus this, measured in the same run.
CUDA_RUNTIME_SCRIPT = textwrap.dedent('''
    import numpy, torch
    b = torch.randn(4096, 16, device="cuda")
    a = torch.randn(16, 4096, device="cuda")
    pinned = [torch.empty(8 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
    pinned[0][:4096].copy_(((b @ a) + 1).to(torch.bfloat16).reshape(-1).view(torch.uint8)[:4096])
    torch.cuda.synchronize()
''')

PEFT_SCRIPT = textwrap.dedent('''
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base, adapter, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    t1 = time.perf_counter()
    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(base, **{dtype_kw: torch.bfloat16})
    t2 = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    t3 = time.perf_counter()
    model = model.merge_and_unload()
    t4 = time.perf_counter()
    model.save_pretrained(out, max_shard_size=shard)
    t5 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_base_s": t2 - t1, "load_adapter_s": t3 - t2,
                      "merge_and_unload_s": t4 - t3, "save_pretrained_s": t5 - t4}))
''')


# -- reading tensors by name ------------------------------------------------------------------

def shard_for(folder: Path, name: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def read_tensor(folder: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(shard_for(folder, name)), framework="pt") as handle:
        return handle.get_tensor(name)


def bf16_ulps(a: Any, b: Any, w0: Any = None) -> tuple[float, int]:
    """max |a − b| in units of the bf16 spacing at max(|a|, |b|, |W0|), and how many elements differ.

    |W0| is in the scale (as in lora-tools verify): where W0 + ΔW nearly cancels, a float32
    sum carries an error of about eps32·|W0|, which is far below W0's own bf16 spacing but
    can be many spacings of the tiny result.
    """
    import torch

    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    diff = (a64 - b64).abs()
    magnitude = torch.maximum(a64.abs(), b64.abs())
    if w0 is not None:
        magnitude = torch.maximum(magnitude, w0.to(torch.float64).abs())
    magnitude = magnitude.clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)
    return float((diff / ulp).max()), int((a != b).sum())


def exact_merged(base: Path, adapter: Path, module: str, scale: float) -> Any:
    """float64 W0 + s·B·A from the stored values."""
    import torch
    from safetensors import safe_open

    w0 = read_tensor(base, f"{module}.weight").to(torch.float64)
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(f"base_model.model.{module}.lora_A.weight").to(torch.float64)
        b = handle.get_tensor(f"base_model.model.{module}.lora_B.weight").to(torch.float64)
    return w0 + scale * (b @ a)


def compare_outputs(base: Path, adapter: Path, outputs: dict[str, Path], spec: synthetic.LlamaShape,
                    scale: float) -> list[dict[str, Any]]:
    """Per checked tensor: each output against float64 exact, and each pair of outputs."""
    last = spec.num_hidden_layers - 1
    adapted = [synthetic.module_path(layer, proj) for layer in dict.fromkeys((0, last // 2, last))
               for proj in ("q_proj", "v_proj", "down_proj")]
    unadapted = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"]
    import torch

    labels = list(outputs)
    rows: list[dict[str, Any]] = []
    for module in adapted:
        name = f"{module}.weight"
        exact = exact_merged(base, adapter, module, scale)
        w0 = read_tensor(base, name)
        tensors = {label: read_tensor(folder, name) for label, folder in outputs.items()}
        row: dict[str, Any] = {"tensor": name, "adapted": True}
        for label in labels:
            row[f"{label} vs fp64 (ulps)"] = bf16_ulps(tensors[label], exact, w0)[0]
        for i, first in enumerate(labels):
            for second in labels[i + 1:]:
                ulps, ndiff = bf16_ulps(tensors[first], tensors[second], w0)
                row[f"{first} vs {second} (ulps)"] = ulps
                row[f"{first} vs {second} (elements differing)"] = ndiff
        rows.append(row)
    for name in unadapted:
        w0 = read_tensor(base, name)
        row = {"tensor": name, "adapted": False}
        for label, folder in outputs.items():
            stored = read_tensor(folder, name)
            row[f"{label} bit-identical to base"] = bool(torch.equal(stored.view(torch.int16), w0.view(torch.int16)))
        rows.append(row)
    return rows


# -- variants ----------------------------------------------------------------------------------

def run_variant(label: str, cmd: list[str], base: Path, *, timeout_s: float | None = None) -> dict[str, Any]:
    warm = synthetic.cat_to_devnull(base)
    bu.sync_seconds()
    print(f"- {label}: warm-up read of the base {warm:.1f} s, running ...", flush=True)
    m = bu.measure(cmd, timeout_s=timeout_s)
    sync = bu.sync_seconds()
    result = {"variant": label, **m.as_dict(), "sync_s": sync, "wall_sync_s": m.wall_s + sync, "warmup_read_s": warm}
    if m.rc != 0:
        print(f"  FAILED (exit status {m.rc}):\n{textwrap.indent(m.stderr[-3000:], '    ')}")
    else:
        print(f"  {m.wall_s:.1f} s (+{sync:.1f} s sync), peak RSS {bu.fmt(m.peak_mb)} MB ({m.rss_parts}), "
              f"peak anon {bu.fmt(m.peak_anon_mb)} MB at {bu.fmt(m.peak_anon_at_s)} s", flush=True)
    return result


def summary_rows(runs: list[dict[str, Any]], largest_mb: float) -> list[list[Any]]:
    """One row per variant: medians over its successful rounds; × floor is the median of
    the ratios to the floor of the same round (a paired ratio shrugs off slow rounds)."""
    floors = {r["round"]: r for r in runs if r["variant"].startswith("floor:") and r["rc"] == 0}
    durable = {r["round"]: r for r in runs if r["variant"] == DURABLE_FLOOR and r["rc"] == 0}
    rows = []
    for label in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == label]
        ok = [r for r in mine if r["rc"] == 0]
        failed = len(mine) - len(ok)
        name = label + (f" ({failed} FAILED, rc={mine[-1]['rc']})" if failed else "")
        if not ok:
            rows.append([name, len(mine), *[None] * 10])
            continue
        walls = [r["wall_sync_s"] for r in ok]
        ratios = [r["wall_sync_s"] / floors[r["round"]]["wall_sync_s"] for r in ok if r["round"] in floors]
        durable_ratios = [r["wall_sync_s"] / durable[r["round"]]["wall_sync_s"] for r in ok if r["round"] in durable]
        peak_anon = max((r["peak_anon_mb"] for r in ok if r["peak_anon_mb"]), default=None)
        rows.append([
            name, len(ok), statistics.median(r["wall_s"] for r in ok), statistics.median(r["sync_s"] for r in ok),
            statistics.median(walls), f"{min(walls):.1f}-{max(walls):.1f}",
            statistics.median(ratios) if ratios else None,
            statistics.median(durable_ratios) if durable_ratios else None,
            max((r["peak_rss_mb"] for r in ok if r["peak_rss_mb"]), default=None),
            max((r["peak_mb"] for r in ok if r["peak_mb"]), default=None),
            peak_anon, peak_anon / largest_mb if peak_anon else None,
        ])
    return rows


def prepare_inputs(work: Path, shape: str, adapter_dtype: str, rank: int, max_shard_bytes: int) -> tuple[Path, Path, dict, dict]:
    spec = synthetic.get_shape(shape)
    base = work / f"base-{spec.name}"
    base_info = bu.cached(base, {"shape": spec.name, "seed": 0, "max_shard_bytes": max_shard_bytes},
                          lambda p: synthetic.write_base(p, spec, max_shard_bytes=max_shard_bytes))
    adapter = work / f"adapter-{spec.name}-r{rank}-{adapter_dtype}"
    adapter_info = bu.cached(adapter, {"shape": spec.name, "rank": rank, "dtype": adapter_dtype, "seed": 1},
                             lambda p: synthetic.write_adapter(p, spec, rank=rank, dtype=adapter_dtype))
    adapter_info.pop("modules", None)
    made = "reused" if base_info["reused"] else "generated in {:.1f} s".format(base_info["seconds"])
    print(f"base {base}: {base_info['n_params'] / 1e9:.2f} B params, {base_info['total_bytes'] / 1e9:.2f} GB in "
          f"{len(base_info['shards'])} shards ({made}); largest tensor {base_info['largest_tensor']} "
          f"{base_info['largest_tensor_bytes'] / 1e6:.0f} MB")
    print(f"adapter {adapter}: {adapter_info['n_modules']} modules, r={rank}, {adapter_dtype}")
    return base, adapter, base_info, adapter_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser)
    parser.add_argument("--skip-peft", action="store_true", help="do not run PEFT (it holds the whole model in memory)")
    parser.add_argument("--skip-cuda", action="store_true", help="do not run lora-tools with --device cuda")
    parser.add_argument("--skip-floor", action="store_true", help="do not run the safetensors and cp floors")
    parser.add_argument("--flatness", action="store_true",
                        help="also merge at the other of 1b/8b with lora-tools (cpu) and compare peak memory")
    parser.add_argument("--adapter-dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-shard-bytes", type=int, default=synthetic.DEFAULT_SHARD_BYTES)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a variant is killed")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of floor, cp and lora-tools, interleaved (PEFT runs in the first only); "
                             "medians are reported, since page-cache and disk timings of a VM vary a lot")
    args = parser.parse_args(argv)
    spec = synthetic.get_shape(args.shape)
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        has_cuda = False

    results: dict[str, Any] = {"benchmark": "merge", "command": bu.command_line(), "machine": bu.machine_info(),
                               "shape": spec.name, "adapter_dtype": args.adapter_dtype, "rank": args.rank,
                               "notes": "warm page cache before every variant; wall+sync includes flushing the output"}
    with bu.workdir(args.workdir, args.keep, "lora-bench-merge-") as work:
        base, adapter, base_info, adapter_info = prepare_inputs(work, spec.name, args.adapter_dtype, args.rank,
                                                               args.max_shard_bytes)
        results["base"], results["adapter"] = base_info, adapter_info
        largest_mb = base_info["largest_tensor_bytes"] / bu.MB
        scale = adapter_info["alpha"] / args.rank
        runs: list[dict[str, Any]] = []
        keep_outputs: dict[str, Path] = {}

        def variant(label: str, cmd: list[str], out: Path, round_index: int, keep_for_compare: bool = False) -> dict[str, Any]:
            bu.remove(out, keep=False)
            run = run_variant(label, cmd, base, timeout_s=args.timeout)
            run["round"] = round_index
            runs.append(run)
            if keep_for_compare and run["rc"] == 0:
                keep_outputs[label] = out
            else:
                bu.remove(out, args.keep)
            return run

        for round_index in range(args.repeat):
            last = round_index == args.repeat - 1
            if args.repeat > 1:
                print(f"round {round_index + 1} of {args.repeat}")
            if not args.skip_floor:
                variant("floor: safetensors load_file+save_file",
                        [sys.executable, "-c", FLOOR_SCRIPT, base, work / "out-floor"], work / "out-floor", round_index)
                variant(DURABLE_FLOOR, [sys.executable, "-c", DURABLE_FLOOR_SCRIPT, base, work / "out-floor"],
                        work / "out-floor", round_index)
                variant("cp -r (byte copy)", ["cp", "-r", base, work / "out-cp"], work / "out-cp", round_index)
            variant("lora-tools merge --device cpu",
                    bu.lora_tools("merge", base, adapter, "-o", work / "out-lt-cpu", "--device", "cpu", "-q"),
                    work / "out-lt-cpu", round_index, keep_for_compare=last)
            if has_cuda and not args.skip_cuda:
                if round_index == 0:
                    runtime = bu.measure([sys.executable, "-c", CUDA_RUNTIME_SCRIPT], timeout_s=args.timeout)
                    results["cuda_runtime_floor"] = runtime.as_dict()
                    print(f"- torch + CUDA + cuBLAS + 32 MB pinned, nothing else: peak RSS {bu.fmt(runtime.peak_mb)} MB "
                          f"({runtime.rss_parts}), exit {runtime.rc}")
                variant("lora-tools merge --device cuda",
                        bu.lora_tools("merge", base, adapter, "-o", work / "out-lt-cuda", "--device", "cuda", "-q"),
                        work / "out-lt-cuda", round_index, keep_for_compare=last)
            if not args.skip_peft and round_index == 0:  # minutes and the whole model in memory: once
                run = variant("PEFT merge_and_unload",
                              [sys.executable, "-c", PEFT_SCRIPT, base, adapter, work / "out-peft", str(args.max_shard_bytes)],
                              work / "out-peft", round_index, keep_for_compare=True)
                if run["rc"] == 0:
                    try:
                        run["phases"] = json.loads(run["stdout"].strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        pass

        rows = summary_rows(runs, largest_mb)
        title = (f"merge: {spec.name} shapes ({base_info['total_bytes'] / 1e9:.2f} GB bf16, {len(base_info['shards'])} "
                 f"shards), adapter r={args.rank} {args.adapter_dtype} on {adapter_info['n_modules']} modules; "
                 f"largest tensor {largest_mb:.0f} MB; {args.repeat} round(s)")
        print("\nEvery variant started after a read of the whole base (warm page cache) and a sync; "
              "'sync s' flushes its output afterwards, and × floor compares wall+sync with the floor's of the "
              "same round (median over rounds; wall+sync is the median, min-max beside it).\n")
        print(bu.table(["variant", "runs", "wall s", "sync s", "wall+sync s", "min-max", "× floor", "× durable floor",
                        "peak RSS MB (polled)", "peak RSS MB (kernel)", "peak anon MB", "anon / largest"],
                       rows, title=title))
        runtime_floor = results.get("cuda_runtime_floor")
        cuda_runs = [r for r in runs if r["variant"] == "lora-tools merge --device cuda" and r["rc"] == 0]
        if runtime_floor and runtime_floor["rc"] == 0 and cuda_runs:
            peak = max(r["peak_mb"] for r in cuda_runs)
            print(f"\nCUDA merge host memory: peak RSS {peak:,.0f} MB, of which the torch + CUDA runtime floor "
                  f"{runtime_floor['peak_mb']:,.0f} MB; lora-tools' own share {peak - runtime_floor['peak_mb']:,.0f} MB")
        peft_run = next((r for r in runs if r["variant"].startswith("PEFT") and r.get("phases")), None)
        if peft_run:
            print("\nPEFT phases (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in peft_run["phases"].items()))
        results["runs"] = runs

        # -- correctness ---------------------------------------------------------------------------
        if keep_outputs:
            short = {"lora-tools merge --device cpu": "lt-cpu", "lora-tools merge --device cuda": "lt-cuda",
                     "PEFT merge_and_unload": "peft"}
            outputs = {short[k]: v for k, v in keep_outputs.items()}
            comparison = compare_outputs(base, adapter, outputs, spec, scale)
            results["correctness"] = comparison
            adapted = [c for c in comparison if c["adapted"]]
            columns = [k for k in adapted[0] if k not in ("tensor", "adapted")]
            print()
            print(bu.table(["tensor", *columns], [[c["tensor"].removeprefix("model."), *[c[k] for k in columns]]
                                                  for c in adapted],
                           title="correctness: adapted tensors (max error in bf16 ulps of max(|W0|, |W|) per element; 0 = bit-identical)"))
            plain = [c for c in comparison if not c["adapted"]]
            columns = [k for k in plain[0] if k not in ("tensor", "adapted")]
            print()
            print(bu.table(["tensor", *columns], [[c["tensor"], *[c[k] for k in columns]] for c in plain],
                           title="correctness: unadapted tensors"))
            for out in keep_outputs.values():
                bu.remove(out, args.keep)

        # -- flatness ------------------------------------------------------------------------------
        if args.flatness:
            other = "8b" if spec.name != "8b" else "1b"
            lt = next((r for r in runs if r["variant"] == "lora-tools merge --device cpu"), None)
            flat_rows = []
            flat = {spec.name: (base_info, lt)}
            print(f"\nflatness: lora-tools merge --device cpu at {other} shapes")
            o_base, o_adapter, o_base_info, _ = prepare_inputs(work, other, args.adapter_dtype, args.rank,
                                                               args.max_shard_bytes)
            out = work / f"out-lt-cpu-{other}"
            bu.remove(out, keep=False)
            o_run = run_variant(f"lora-tools merge --device cpu ({other})",
                                bu.lora_tools("merge", o_base, o_adapter, "-o", out, "--device", "cpu", "-q"),
                                o_base, timeout_s=args.timeout)
            bu.remove(out, args.keep)
            flat[other] = (o_base_info, o_run)
            for name in ("1b", "8b"):
                info, run = flat[name]
                if run is None:
                    continue
                largest = info["largest_tensor_bytes"] / bu.MB
                flat_rows.append([name, info["total_bytes"] / 1e9, largest, run["wall_s"], run["peak_anon_mb"],
                                  run["peak_mb"], run["peak_anon_mb"] / largest if run["peak_anon_mb"] else None,
                                  run["peak_anon_mb"] / (info["total_bytes"] / bu.MB) if run["peak_anon_mb"] else None])
            print()
            print(bu.table(["shape", "model GB", "largest tensor MB", "wall s", "peak anon MB", "peak RSS MB",
                            "anon / largest", "anon / model"], flat_rows,
                           title="flatness: lora-tools peak memory vs model size"))
            if len(flat_rows) == 2 and flat_rows[0][4] and flat_rows[1][4]:
                ratio = flat_rows[1][4] / flat_rows[0][4]
                print(f"\npeak anon 8B / 1B = {ratio:.2f} (model size ratio {flat_rows[1][1] / flat_rows[0][1]:.1f}, "
                      f"largest-tensor ratio {flat_rows[1][2] / flat_rows[0][2]:.1f})")
                results["flatness"] = {"rows": flat_rows, "anon_ratio_8b_1b": ratio}
            results["flatness_runs"] = [o_run]
    bu.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
