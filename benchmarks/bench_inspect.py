"""Benchmark `lora-tools inspect` against dense SVDs, and check its singular values.

An adapter with Llama-3.2-1B shapes (r=16 on all seven projections of 16 layers: 112
modules, bf16 factors) is generated, then, in one run:

  python -c pass                          interpreter start-up, the floor
  python -c "import lora_tools.cli"       start-up plus the CLI module
  python -m lora_tools inspect A --json   the real thing, wall time incl. start-up
  inspect_adapter(A) in-process           the same work without any start-up
  dense torch.linalg.svdvals(s·B@A)       float32, in-process, summed over the modules
  dense numpy float64 SVD of s·B@A        the accuracy reference (also timed)

The subprocess rows are best of --repeat (5) runs. Accuracy: max over all modules of
max_i |σ_i(inspect) − σ_i(ref)| / σ_1(ref) must be ≤ 1e-6. Targets: inspect ≤ 0.5 s
wall, and ≥ 200× faster than the dense float32 svdvals total.

    PYTHONPATH=. python3 benchmarks/bench_inspect.py [--shape 1b|8b|tiny] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402

TARGET_WALL_S = 0.5
TARGET_SPEEDUP = 200.0
TARGET_REL_ERROR = 1e-6


def load_factors(adapter: Path) -> dict[str, tuple[Any, Any]]:
    """module path -> (B, A) as stored (torch tensors), in file order of the modules."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    modules: dict[str, list[Any]] = {}
    for key in tensors:
        if ".lora_A." in key or ".lora_B." in key:
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            modules.setdefault(module, [None, None])
    for module, pair in modules.items():
        prefix = f"base_model.model.{module}"
        pair[0] = tensors[f"{prefix}.lora_B.weight"]
        pair[1] = tensors[f"{prefix}.lora_A.weight"]
    return {m: (b, a) for m, (b, a) in modules.items()}


def layer_index(module: str) -> int:
    return int(module.split(".")[2])


def dense_svdvals(factors: dict[str, tuple[Any, Any]], scale: float, layers: set[int] | None) -> dict[str, Any]:
    """Per module: float32 torch svdvals time and values, float64 numpy reference time and values."""
    import torch

    results: dict[str, Any] = {}
    for module, (b, a) in factors.items():
        if layers is not None and layer_index(module) not in layers:
            continue
        b32, a32 = b.to(torch.float32), a.to(torch.float32)
        started = time.perf_counter()
        sv32 = torch.linalg.svdvals(scale * (b32 @ a32))
        t32 = time.perf_counter() - started
        b64, a64 = b32.double().numpy(), a32.double().numpy()
        started = time.perf_counter()
        sv64 = np.linalg.svd(scale * (b64 @ a64), compute_uv=False)
        t64 = time.perf_counter() - started
        results[module] = {
            "shape": [int(b.shape[0]), int(a.shape[1])], "t32": t32, "t64": t64,
            "sv32": sv32[: b.shape[1]].double().numpy(), "sv64": sv64[: b.shape[1]],
        }
        print(f"  dense {module:40s} {tuple(results[module]['shape'])!s:14s} fp32 {t32:6.2f} s   fp64 {t64:6.2f} s",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="subprocess runs per start-up row (best is kept)")
    parser.add_argument("--dense-layers", type=int, default=None,
                        help="run the dense SVDs on only this many decoder layers (spread over depth) and "
                             "extrapolate the total; the accuracy check then covers those layers only "
                             "(default: every layer)")
    args = parser.parse_args(argv)
    spec = synthetic.get_shape(args.shape)

    results: dict[str, Any] = {"benchmark": "inspect", "command": bu.command_line(), "machine": bu.machine_info(),
                               "shape": spec.name, "rank": args.rank}
    with bu.workdir(args.workdir, args.keep, "lora-bench-inspect-") as work:
        adapter = work / f"adapter-{spec.name}-r{args.rank}-bf16"
        info = bu.cached(adapter, {"shape": spec.name, "rank": args.rank, "dtype": "bf16", "seed": 1},
                         lambda p: synthetic.write_adapter(p, spec, rank=args.rank, dtype="bf16"))
        info.pop("modules", None)
        results["adapter"] = info
        n_modules = info["n_modules"]
        made = "reused" if info["reused"] else "generated in {:.2f} s".format(info["seconds"])
        print(f"adapter: {adapter} ({n_modules} modules, r={args.rank}, bf16, {made})")

        # -- subprocess start-up and inspect ---------------------------------------------------
        floor, floor_all = bu.best_of([sys.executable, "-c", "pass"], args.repeat)
        imp, imp_all = bu.best_of([sys.executable, "-c", "import lora_tools.cli"], args.repeat)
        insp, insp_all = bu.best_of(bu.lora_tools("inspect", adapter, "--json"), args.repeat)
        # numpy's BLAS (OpenBLAS) threads its small QRs; on a busy machine that costs a lot.
        one_thread = bu.child_env({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        insp1, insp1_all = bu.best_of(bu.lora_tools("inspect", adapter, "--json"), args.repeat, env=one_thread)
        report = json.loads(insp.stdout)
        if report["adapter"]["n_layers"] != n_modules:
            raise SystemExit(f"inspect reported {report['adapter']['n_layers']} layers, expected {n_modules}")
        print(f"inspect --json: {insp.wall_s:.3f} s best of {args.repeat} ({', '.join(f'{t:.3f}' for t in insp_all)}), "
              f"peak RSS {bu.fmt(insp.peak_mb)} MB")

        # -- in-process inspect (no interpreter start, imports already paid) ---------------------
        sys.path.insert(0, str(bu.REPO_ROOT))
        from lora_tools.inspect import inspect_adapter

        inspect_adapter(adapter)  # warm the imports and the page cache
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            inspect_adapter(adapter)
            times.append(time.perf_counter() - started)
        inproc = min(times)

        # -- dense baselines and accuracy ----------------------------------------------------------
        factors = load_factors(adapter)
        scale = info["alpha"] / args.rank
        layers = None
        if args.dense_layers is not None and args.dense_layers < spec.num_hidden_layers:
            count = max(1, args.dense_layers)
            layers = {round(i * (spec.num_hidden_layers - 1) / max(1, count - 1)) for i in range(count)}
        print(f"dense SVDs on {'all' if layers is None else len(layers)} of {spec.num_hidden_layers} layers "
              f"({len(factors) if layers is None else sum(layer_index(m) in layers for m in factors)} modules)...")
        dense = dense_svdvals(factors, scale, layers)
        by_type: dict[str, list[dict[str, Any]]] = {}
        for module, row in dense.items():
            by_type.setdefault(module.rsplit(".", 1)[1], []).append(row)
        if layers is None:
            dense32 = sum(r["t32"] for r in dense.values())
            dense64 = sum(r["t64"] for r in dense.values())
        else:  # every module of a type has the same shape: its mean time times the module count
            per_type = spec.num_hidden_layers
            dense32 = sum(np.mean([r["t32"] for r in rows]) * per_type for rows in by_type.values())
            dense64 = sum(np.mean([r["t64"] for r in rows]) * per_type for rows in by_type.values())

        # Other processes on a small machine inflate single timings (BLAS threads spin while
        # descheduled): the fastest module of each type times the count is the robust figure.
        per_type_count = {proj: sum(m.endswith("." + proj) for m in factors) for proj in by_type}
        dense32_robust = sum(min(r["t32"] for r in rows) * per_type_count[p] for p, rows in by_type.items())
        dense64_robust = sum(min(r["t64"] for r in rows) * per_type_count[p] for p, rows in by_type.items())

        ours = {layer["name"]: np.asarray(layer["singular_values"], dtype=np.float64) for layer in report["layers"]}
        worst_ours, worst_fp32, worst_module = 0.0, 0.0, None
        for module, row in dense.items():
            ref = row["sv64"]
            sigma1 = float(ref[0])
            err_ours = float(np.max(np.abs(ours[module] - ref))) / sigma1
            err_fp32 = float(np.max(np.abs(row["sv32"] - ref))) / sigma1
            if err_ours > worst_ours:
                worst_ours, worst_module = err_ours, module
            worst_fp32 = max(worst_fp32, err_fp32)

        # -- table ---------------------------------------------------------------------------------
        wall = insp.wall_s
        rows = [
            ["python -c pass (start-up floor)", floor.wall_s, floor.wall_s / wall],
            ["python -c 'import lora_tools.cli'", imp.wall_s, imp.wall_s / wall],
            [f"lora-tools inspect --json ({n_modules} modules)", wall, 1.0],
            ["  same, OPENBLAS_NUM_THREADS=1", insp1.wall_s, insp1.wall_s / wall],
            ["  inspect_adapter() in-process (no start-up)", inproc, inproc / wall],
            ["  inspect wall − python start-up", wall - floor.wall_s, (wall - floor.wall_s) / wall],
            [f"dense torch svdvals fp32, total{'' if layers is None else ' (extrapolated)'}", dense32, dense32 / wall],
            [f"dense numpy SVD fp64 (reference), total{'' if layers is None else ' (extrapolated)'}", dense64,
             dense64 / wall],
            ["dense torch svdvals fp32, robust total (fastest per type × count)", dense32_robust, dense32_robust / wall],
            ["dense numpy SVD fp64, robust total (fastest per type × count)", dense64_robust, dense64_robust / wall],
        ]
        print()
        print(bu.table(["variant", "seconds", "× inspect wall"], rows,
                       title=f"inspect: {spec.name} shapes, r={args.rank}, bf16 factors, {n_modules} modules"))
        per_type_rows = []
        for proj in synthetic.PROJECTIONS:
            if proj in by_type:
                shape = by_type[proj][0]["shape"]
                t32 = [r["t32"] for r in by_type[proj]]
                t64 = [r["t64"] for r in by_type[proj]]
                per_type_rows.append([f"{proj} {shape[0]}×{shape[1]}", float(np.mean(t32)), min(t32),
                                      float(np.mean(t64)), min(t64), len(t32)])
        print()
        print(bu.table(["module type (out×in)", "fp32 svdvals mean s", "fp32 min s", "fp64 numpy mean s",
                        "fp64 min s", "modules timed"],
                       per_type_rows, title="dense cost per module type"))
        speedup = min(dense32, dense32_robust) / wall
        checks = [
            ["inspect wall ≤ 0.5 s", f"{wall:.3f} s", wall <= TARGET_WALL_S],
            ["dense fp32 total (robust) / inspect wall ≥ 200×", f"{speedup:,.0f}×", speedup >= TARGET_SPEEDUP],
            ["max_i abs(σ_ours − σ_ref) / σ1 ≤ 1e-6", f"{worst_ours:.2e} ({worst_module})", worst_ours <= TARGET_REL_ERROR],
            ["  (for scale: dense fp32 svdvals error)", f"{worst_fp32:.2e}", None],
        ]
        print()
        print(bu.table(["target", "measured", "met"], [[c[0], c[1], "–" if c[2] is None else ("yes" if c[2] else "NO")]
                                                        for c in checks], title="targets"))

        results.update({
            "python_pass_s": floor.wall_s, "python_pass_all_s": floor_all,
            "import_cli_s": imp.wall_s, "import_cli_all_s": imp_all,
            "inspect_wall_s": wall, "inspect_all_s": insp_all, "inspect_peak_rss_mb": insp.peak_mb,
            "inspect_wall_1thread_s": insp1.wall_s, "inspect_1thread_all_s": insp1_all,
            "inspect_inprocess_s": inproc, "dense_fp32_total_s": dense32, "dense_fp64_total_s": dense64,
            "dense_fp32_robust_total_s": dense32_robust, "dense_fp64_robust_total_s": dense64_robust,
            "dense_extrapolated": layers is not None, "dense_layers": sorted(layers) if layers else None,
            "dense_modules_timed": len(dense),
            "dense_per_module": {m: {"shape": r["shape"], "fp32_s": r["t32"], "fp64_s": r["t64"]} for m, r in dense.items()},
            "speedup_vs_dense_fp32": speedup, "max_rel_sv_error": worst_ours, "max_rel_sv_error_module": worst_module,
            "dense_fp32_max_rel_sv_error": worst_fp32,
            "targets": {"inspect_wall_s": TARGET_WALL_S, "speedup": TARGET_SPEEDUP, "rel_error": TARGET_REL_ERROR},
            "met": {"wall": wall <= TARGET_WALL_S, "speedup": speedup >= TARGET_SPEEDUP,
                    "accuracy": worst_ours <= TARGET_REL_ERROR},
        })
    results["loadavg_end"] = bu.machine_info().get("loadavg")
    bu.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
