"""Benchmark `lora-tools verify` (time, memory, what it catches) against deltalint.

A synthetic Llama checkpoint (1B shapes by default) and a PEFT adapter are generated and
merged with lora-tools; then, in one run:

  1. `python -m lora_tools verify BASE ADAPTER MERGED --json` and deltalint on the same
     healthy merge, interleaved for `--rounds` rounds (default 3; the order alternates
     per round: lt, dl | dl, lt | ...): wall time, peak RSS, verdict of every run, and the
     medians, with deltalint's median over lora-tools' (the speed-up). This VM's page
     cache and cores are shared, so single runs of the same command vary by ±30 % and
     more; only figures from the same run, interleaved, are compared;
  2. deltalint (a verifier on PyPI, `deltalint check --base B --adapter A --merged M`):
     installed with `pip install --no-deps --target WORKDIR/deltalint-pkgs deltalint`
     (its only dependencies, torch and safetensors, are taken from this interpreter; a
     venv made from a venv would not see them) and run as `python -m deltalint.cli`.
     When it cannot be installed or run, the reason is printed and it is skipped;
     `--deltalint-wheel FILE` installs from a wheel on disk (offline machines);
  3. a detection table: corrupt copies of the merged checkpoint, each a hard-linked copy
     with only the affected shard rewritten:
        not applied      one adapted tensor left equal to the base
        half strength    W0 + 0.5·ΔW
        5 % too strong   W0 + 1.05·ΔW
        sign flipped     W0 − ΔW
        swapped          two same-shaped layers get each other's update
        unadapted +1e-2  one element of an unadapted tensor (the embedding) moved by
                         1e-2·max abs(W)
     and which tool catches each (lora-tools must exit with status 1 on every one, and
     0 on the healthy merge; deltalint: 0 verified, 1 failed, 3 inconclusive).

Before each timed run the base and the checked checkpoint are read once (warm cache).

    PYTHONPATH=. python3 benchmarks/bench_verify.py [--shape 1b|8b|tiny] [--rounds 3] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402
from bench_merge import prepare_inputs, read_tensor, shard_for  # noqa: E402

DELTALINT_EXIT = {0: "verified", 1: "FAILED", 2: "error", 3: "inconclusive"}


# -- deltalint ---------------------------------------------------------------------------------

def install_deltalint(work: Path, wheel: Path | None) -> tuple[Path | None, str]:
    """(folder to put on PYTHONPATH, what happened); (None, reason) when unavailable."""
    target = work / "deltalint-pkgs"
    if (target / "deltalint" / "cli.py").exists():
        return target, "reused " + str(target)
    for module in ("torch", "safetensors"):
        try:
            __import__(module)
        except ImportError:
            return None, f"its dependency {module} is not importable here"
    source = str(wheel) if wheel else "deltalint"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           *(["--no-index"] if wheel else []),  # a wheel on disk: never the network (offline machines)
           "--target", str(target), source]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip install failed: {exc}"
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-3:]
        shutil.rmtree(target, ignore_errors=True)
        return None, "pip install deltalint failed: " + " / ".join(last)
    probe = subprocess.run([sys.executable, "-m", "deltalint.cli", "--version"], capture_output=True, text=True,
                           env=bu.child_env({"PYTHONPATH": str(target)}), timeout=120)
    if probe.returncode != 0:
        return None, "deltalint installed but does not run: " + probe.stderr.strip()[-300:]
    return target, f"installed {probe.stdout.strip()} into {target}"


def deltalint_cmd(base: Path, adapter: Path, merged: Path) -> list[str]:
    return [sys.executable, "-m", "deltalint.cli", "check", "--base", str(base), "--adapter", str(adapter),
            "--merged", str(merged), "--json"]


def run_deltalint(pkgs: Path, base: Path, adapter: Path, merged: Path, timeout: float) -> dict[str, Any]:
    env = bu.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(pkgs), env["PYTHONPATH"]])
    m = bu.measure(deltalint_cmd(base, adapter, merged), env=env, timeout_s=timeout)
    out: dict[str, Any] = {**m.as_dict(), "outcome": DELTALINT_EXIT.get(m.rc, f"exit {m.rc}")}
    try:
        report = json.loads(m.stdout)
        out["verdict"] = report.get("verdict")
        layers = report.get("layers") or []
        bad = [layer for layer in layers if str(layer.get("verdict", "")).upper() not in ("PASS",)]
        out["flagged"] = [f"{layer.get('name')}: {layer.get('verdict')}" for layer in bad][:12]
        out["n_layers"] = len(layers)
        out["counts"] = {}
        for layer in layers:
            verdict = str(layer.get("verdict"))
            out["counts"][verdict] = out["counts"].get(verdict, 0) + 1
    except (ValueError, AttributeError):
        out["verdict"] = None
    return out


# -- lora-tools verify -------------------------------------------------------------------------

def run_lora_tools_verify(base: Path, adapter: Path, merged: Path, timeout: float) -> dict[str, Any]:
    m = bu.measure(bu.lora_tools("verify", base, adapter, merged, "--json"), timeout_s=timeout)
    out: dict[str, Any] = {**m.as_dict(), "outcome": {0: "equivalent", 1: "NOT equivalent"}.get(m.rc, f"exit {m.rc}")}
    try:
        report = json.loads(m.stdout)
        out["equivalent"] = report.get("equivalent")
        out["n_adapted"] = report.get("n_adapted")
        out["n_failed"] = report.get("n_failed")
        out["n_inconclusive"] = report.get("n_inconclusive")
        out["n_unadapted"] = report.get("n_unadapted")
        out["n_unadapted_identical"] = report.get("n_unadapted_identical")
        out["flagged"] = [f"{t['name']}: {t['verdict']}" + (f" ({t['detail']})" if t.get("detail") else "")
                          for t in report.get("tensors", []) if t.get("verdict") != "ok"]
        out["flagged"] += [f"{n}: changed" for n in report.get("changed_unadapted", [])]
        out["flagged"] += list(report.get("layout_problems", []))
        recipes: dict[str, int] = {}
        for t in report.get("tensors", []):
            recipes[str(t.get("recipe"))] = recipes.get(str(t.get("recipe")), 0) + 1
        out["recipes"] = recipes
    except (ValueError, TypeError):
        out["equivalent"] = None
    return out


def warm(*folders: Path) -> float:
    return sum(synthetic.cat_to_devnull(f) for f in folders)


# -- corrupt copies ----------------------------------------------------------------------------

def delta(adapter: Path, module: str, scale: float) -> Any:
    """s·B·A in float32, as a merge computes it."""
    import torch
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(f"base_model.model.{module}.lora_A.weight").to(torch.float32)
        b = handle.get_tensor(f"base_model.model.{module}.lora_B.weight").to(torch.float32)
    return (b @ a) * scale


def corrupt_copy(merged: Path, out: Path, replacements: dict[str, Any]) -> list[str]:
    """`out` = `merged` with some tensors replaced: shards holding them are rewritten, every
    other file is hard-linked (copied where links are not possible). Returns rewritten shards."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    dirty = {shard_for(merged, name).name for name in replacements}
    for entry in sorted(merged.iterdir()):
        target = out / entry.name
        if entry.name in dirty:
            tensors = load_file(str(entry))
            for name, value in replacements.items():
                if name in tensors:
                    if value.shape != tensors[name].shape:
                        raise ValueError(f"{name}: replacement shape {tuple(value.shape)} != {tuple(tensors[name].shape)}")
                    tensors[name] = value.to(tensors[name].dtype).contiguous()
            save_file(tensors, str(target), metadata={"format": "pt"})
            del tensors
        elif entry.is_file():
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
        else:
            shutil.copytree(entry, target)
    return sorted(dirty)


def corruption_cases(base: Path, adapter: Path, spec: synthetic.LlamaShape, scale: float) -> list[dict[str, Any]]:
    """The corrupt tensors of each case (computed in float32, rounded once to bf16, as a merge would)."""
    import torch

    n = spec.num_hidden_layers
    pick = lambda fraction: min(n - 1, int(fraction * n))  # noqa: E731
    cases: list[dict[str, Any]] = []

    def strength(key: str, label: str, module: str, k: float) -> None:
        w0 = read_tensor(base, f"{module}.weight").to(torch.float32)
        value = (w0 + k * delta(adapter, module, scale)).to(torch.bfloat16) if k else w0.to(torch.bfloat16)
        cases.append({"case": key, "label": label, "tensors": {f"{module}.weight": value},
                      "expect": [f"{module}.weight"]})

    strength("not_applied", "not applied (merged = base)", synthetic.module_path(pick(0.2), "q_proj"), 0.0)
    strength("half", "half strength (0.5·ΔW)", synthetic.module_path(pick(0.35), "v_proj"), 0.5)
    strength("too_strong_5pct", "5 % too strong (1.05·ΔW)", synthetic.module_path(pick(0.45), "down_proj"), 1.05)
    strength("sign_flip", "sign flipped (−ΔW)", synthetic.module_path(pick(0.55), "o_proj"), -1.0)
    first, second = pick(0.7), min(n - 1, pick(0.7) + 1)
    if first == second:
        first = max(0, second - 1)
    m1, m2 = synthetic.module_path(first, "gate_proj"), synthetic.module_path(second, "gate_proj")
    w1 = read_tensor(base, f"{m1}.weight").to(torch.float32)
    w2 = read_tensor(base, f"{m2}.weight").to(torch.float32)
    cases.append({"case": "swapped", "label": f"updates of layers {first} and {second} gate_proj swapped",
                  "tensors": {f"{m1}.weight": (w1 + delta(adapter, m2, scale)).to(torch.bfloat16),
                              f"{m2}.weight": (w2 + delta(adapter, m1, scale)).to(torch.bfloat16)},
                  "expect": [f"{m1}.weight", f"{m2}.weight"]})
    name = "model.embed_tokens.weight"
    emb = read_tensor(base, name).clone()
    bump = 1e-2 * float(emb.abs().max())
    row, col = emb.shape[0] // 3, emb.shape[1] // 5
    before = emb[row, col].clone()
    emb[row, col] = (emb[row, col].to(torch.float32) + bump).to(torch.bfloat16)
    if torch.equal(before, emb[row, col]):
        raise RuntimeError("the 1e-2·max abs(W) bump vanished in bf16 rounding")
    cases.append({"case": "unadapted_element", "label": f"unadapted element {name}[{row},{col}] + 1e-2·max abs(W)",
                  "tensors": {name: emb}, "expect": [name]})
    return cases


def summarize(lt_runs: list[dict[str, Any]], dl_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the rounds, the speed-up (deltalint's median over lora-tools'), each
    round's ratio, and the largest peak memory of any round."""
    def peak(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return max(values) if values else None

    out: dict[str, Any] = {
        "rounds": len(lt_runs),
        "lt_walls": [round(r["wall_s"], 2) for r in lt_runs],
        "lt_median_s": statistics.median(r["wall_s"] for r in lt_runs),
        "lt_peak_mb": peak(lt_runs, "peak_mb"), "lt_peak_anon_mb": peak(lt_runs, "peak_anon_mb"),
    }
    if dl_runs:
        out.update({
            "dl_walls": [round(r["wall_s"], 2) for r in dl_runs],
            "dl_median_s": statistics.median(r["wall_s"] for r in dl_runs),
            "dl_peak_mb": peak(dl_runs, "peak_mb"), "dl_peak_anon_mb": peak(dl_runs, "peak_anon_mb"),
            "round_ratios": [d["wall_s"] / l["wall_s"] for l, d in zip(lt_runs, dl_runs)],  # noqa: E741
        })
        out["speedup"] = out["dl_median_s"] / out["lt_median_s"]
    return out


def caught_names(expect: list[str], flagged: list[str]) -> bool:
    """Every expected tensor/module is named by a flagged line ("<name>: <verdict>...")."""
    return all(any(item.split(":", 1)[0].strip() == name for item in flagged) for name in expect)


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser)
    parser.add_argument("--adapter-dtype", default="fp32", choices=["bf16", "fp32"],
                        help="dtype of the adapter factors (fp32 is what PEFT saves by default)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-shard-bytes", type=int, default=synthetic.DEFAULT_SHARD_BYTES)
    parser.add_argument("--skip-deltalint", action="store_true")
    parser.add_argument("--deltalint-wheel", type=Path, default=None, help="install deltalint from this wheel file")
    parser.add_argument("--skip-detection", action="store_true", help="only time the healthy verify")
    parser.add_argument("--cases", default=None,
                        help="comma-separated subset of: not_applied,half,too_strong_5pct,sign_flip,swapped,"
                             "unadapted_element")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before one tool run is killed")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of both tools on the healthy merge; medians are reported")
    args = parser.parse_args(argv)
    spec = synthetic.get_shape(args.shape)

    results: dict[str, Any] = {"benchmark": "verify", "command": bu.command_line(), "machine": bu.machine_info(),
                               "shape": spec.name, "adapter_dtype": args.adapter_dtype, "rank": args.rank}
    with bu.workdir(args.workdir, args.keep, "lora-bench-verify-") as work:
        base, adapter, base_info, adapter_info = prepare_inputs(work, spec.name, args.adapter_dtype, args.rank,
                                                               args.max_shard_bytes)
        results["base"], results["adapter"] = base_info, adapter_info
        scale = adapter_info["alpha"] / args.rank
        merged = work / f"merged-{spec.name}-{args.adapter_dtype}"
        if not (merged / "config.json").exists():
            bu.remove(merged, keep=False)
            m = bu.measure(bu.lora_tools("merge", base, adapter, "-o", merged, "--device", "cpu", "-q"), check=True)
            print(f"merged with lora-tools in {m.wall_s:.1f} s -> {merged}")
            results["merge"] = m.as_dict()

        # -- healthy merge: both tools, interleaved rounds -------------------------------------
        pkgs: Path | None = None
        if args.skip_deltalint:
            why = "skipped (--skip-deltalint)"
        else:
            pkgs, why = install_deltalint(work, args.deltalint_wheel)
        print(f"deltalint: {why}")
        results["deltalint_setup"] = why
        lt_runs: list[dict[str, Any]] = []
        dl_runs: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            order = ["lt", "dl"] if round_index % 2 == 0 else ["dl", "lt"]
            for tool in order:
                if tool == "dl" and pkgs is None:
                    continue
                warm(base, merged)
                if tool == "lt":
                    run = run_lora_tools_verify(base, adapter, merged, args.timeout)
                    lt_runs.append(run)
                    print(f"round {round_index + 1}: lora-tools verify {run['wall_s']:.1f} s, exit {run['rc']} "
                          f"({run['outcome']}), peak RSS {bu.fmt(run['peak_mb'])} MB; recipes {run.get('recipes')}")
                    if run["rc"] not in (0, 1):
                        print(textwrap.indent(run["stderr"][-3000:], "    "))
                else:
                    assert pkgs is not None
                    run = run_deltalint(pkgs, base, adapter, merged, args.timeout)
                    dl_runs.append(run)
                    print(f"round {round_index + 1}: deltalint check {run['wall_s']:.1f} s, exit {run['rc']} "
                          f"({run['outcome']}), peak RSS {bu.fmt(run['peak_mb'])} MB; layers {run.get('counts')}")
                    if run["rc"] == 2:
                        print(textwrap.indent(run["stderr"][-2000:], "    "))
        lt = lt_runs[0]
        dl = dl_runs[0] if dl_runs else None
        summary = summarize(lt_runs, dl_runs)
        results["lora_tools_healthy_rounds"] = lt_runs
        results["deltalint_healthy_rounds"] = dl_runs
        results["healthy_summary"] = summary
        results["lora_tools_healthy"], results["deltalint_healthy"] = lt, dl
        rows = [["lora-tools verify", summary["lt_median_s"], summary["lt_walls"], 1.0, summary["lt_peak_mb"],
                 summary["lt_peak_anon_mb"], sorted({r["rc"] for r in lt_runs}),
                 lt["outcome"] + (f", {lt.get('n_adapted')} adapted / {lt.get('n_unadapted')} other tensors"
                                  if lt.get("n_adapted") is not None else "")]]
        if dl is not None:
            rows.append(["deltalint check", summary["dl_median_s"], summary["dl_walls"], summary["speedup"],
                         summary["dl_peak_mb"], summary["dl_peak_anon_mb"], sorted({r["rc"] for r in dl_runs}),
                         dl["outcome"] + (f", {dl.get('n_layers')} layers" if dl.get("n_layers") else "")])
        else:
            rows.append(["deltalint check", None, None, None, None, None, None, why])
        print()
        print(bu.table(["tool", "median wall s", "rounds s", "× lora-tools", "peak RSS MB (max)", "peak anon MB (max)",
                        "exit", "verdict"], rows,
                       title=f"verify a healthy merge: {spec.name} shapes, {adapter_info['n_modules']} adapted modules, "
                             f"adapter {args.adapter_dtype}, {args.rounds} interleaved rounds"))
        if summary.get("speedup") is not None:
            print(f"\ndeltalint median / lora-tools median: {summary['speedup']:.2f}× "
                  f"(per round: {', '.join(f'{r:.2f}' for r in summary['round_ratios'])})")

        # -- detection -------------------------------------------------------------------------
        if not args.skip_detection:
            cases = corruption_cases(base, adapter, spec, scale)
            if args.cases:
                wanted = set(args.cases.split(","))
                cases = [c for c in cases if c["case"] in wanted]
            detection = [{"case": "healthy", "label": "healthy merge (no corruption)", "lora_tools": lt,
                          "deltalint": dl, "expect": []}]
            for case in cases:
                folder = work / f"corrupt-{case['case']}"
                bu.remove(folder, keep=False)
                rewritten = corrupt_copy(merged, folder, case["tensors"])
                print(f"- {case['label']}: rewrote {', '.join(rewritten)}; checking ...", flush=True)
                warm(base, folder)
                case_lt = run_lora_tools_verify(base, adapter, folder, args.timeout)
                case_dl = run_deltalint(pkgs, base, adapter, folder, args.timeout) if pkgs else None
                print(f"  lora-tools exit {case_lt['rc']} in {case_lt['wall_s']:.1f} s: {case_lt.get('flagged')}")
                if case_dl:
                    print(f"  deltalint  exit {case_dl['rc']} in {case_dl['wall_s']:.1f} s: {case_dl.get('flagged')}")
                detection.append({"case": case["case"], "label": case["label"], "lora_tools": case_lt,
                                  "deltalint": case_dl, "expect": case["expect"], "rewritten": rewritten})
                bu.remove(folder, args.keep)
            det_rows = []
            all_caught = True
            for d in detection:
                healthy = d["case"] == "healthy"
                lt_ok = (d["lora_tools"]["rc"] == 0) if healthy else (d["lora_tools"]["rc"] == 1)
                named = healthy or caught_names(d["expect"], d["lora_tools"].get("flagged") or [])
                all_caught &= lt_ok
                lt_cell = f"{('ok' if healthy else 'caught') if lt_ok else ('FALSE ALARM' if healthy else 'MISSED')} (exit {d['lora_tools']['rc']}" + \
                          ("" if healthy else f", {'names it' if named else 'does not name it'}") + ")"
                if d["deltalint"] is None:
                    dl_cell = "–"
                else:
                    rc = d["deltalint"]["rc"]
                    flagged = d["deltalint"].get("flagged") or []
                    if healthy:
                        dl_cell = {0: "ok", 1: "FALSE ALARM", 3: "inconclusive"}.get(rc, "error") + f" (exit {rc}"
                        dl_cell += f", flags {len(flagged)} layers)" if flagged else ")"
                    else:
                        modules = [name.removesuffix(".weight") for name in d["expect"]]
                        named = caught_names(modules, flagged)
                        extra = sum(item.split(":", 1)[0].strip() not in modules for item in flagged)
                        dl_cell = {0: "MISSED", 1: "caught", 3: "inconclusive"}.get(rc, "error") + f" (exit {rc}"
                        if rc == 1:
                            dl_cell += ", names it" if named else ", does not name it"
                            if extra > 0:
                                dl_cell += f", +{extra} healthy layers flagged"
                        dl_cell += ")"
                detail = "; ".join((d["lora_tools"].get("flagged") or [])[:2])
                det_rows.append([d["label"], lt_cell, dl_cell, d["lora_tools"]["wall_s"],
                                 d["deltalint"]["wall_s"] if d["deltalint"] else None, detail[:110]])
            print()
            print(bu.table(["case", "lora-tools verify", "deltalint check", "lt s", "dl s", "lora-tools says"], det_rows,
                           title="detection: corrupt copies of the merged checkpoint"))
            print(f"\nlora-tools caught every corruption and passed the healthy merge: {'yes' if all_caught else 'NO'}")
            results["detection"] = [{k: v for k, v in d.items()} for d in detection]
            results["lora_tools_caught_all"] = all_caught
        if not args.keep:
            bu.remove(merged, keep=False)
    bu.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
