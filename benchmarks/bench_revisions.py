"""Two source trees of lora-tools, timed on the same inputs in one run: a refactor's cost.

A change that should not change speed (a reshape of the package, a renamed module) is
held to that here: every command runs under this checkout and under another one (a
`git worktree` of the revision before), in interleaved rounds on the same synthetic
inputs, and the table shows the medians and new/old. Outputs of both trees are compared
byte for byte too: a refactor that changes a merged or blended file is not a refactor.

    git worktree add /tmp/lora-old 096ae87
    PYTHONPATH=. python3 benchmarks/bench_revisions.py --old /tmp/lora-old            # 1B, 3 rounds
    PYTHONPATH=. python3 benchmarks/bench_revisions.py --old /tmp/lora-old --shape tiny --rounds 1
"""

from __future__ import annotations

import argparse
import filecmp
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
import synthetic  # noqa: E402

COMMANDS = ("inspect", "inspect --base", "merge", "blend", "verify")


def tree_env(root: Path) -> dict[str, str]:
    """Children import lora_tools from `root` only: first on PYTHONPATH, and their working
    folder (`python -m` puts the working folder before PYTHONPATH)."""
    benchutil.compile_package(root)  # both trees alike
    env = benchutil.child_env()
    env["PYTHONPATH"] = str(root)
    return env


def command(name: str, work: Path, out: Path) -> list[str]:
    base, adapter, other = work / "base", work / "adapter", work / "adapter2"
    if name == "inspect":
        return benchutil.lora_tools("inspect", adapter, "--json")
    if name == "inspect --base":  # reads the base too, for ‖ΔW‖/‖W0‖
        return benchutil.lora_tools("inspect", adapter, "--base", base, "--json")
    if name == "merge":
        return benchutil.lora_tools("merge", base, adapter, "-o", out, "--device", "cpu", "-q")
    if name == "blend":
        return benchutil.lora_tools("blend", adapter, other, "--weight", "0.3", "--method", "svd", "-o", out)
    return benchutil.lora_tools("verify", base, adapter, out)  # `out` is a merge made by this tree


def same_output(a: Path, b: Path) -> bool:
    if a.is_file():
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="root of the other checkout (holds lora_tools/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS), metavar="COMMAND",
                        help=f"which to time (default all: {', '.join(COMMANDS)}; verify needs merge)")
    benchutil.common_arguments(parser)
    args = parser.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": benchutil.REPO_ROOT}
    for label, root in trees.items():  # an editable install or the working folder must not win
        probe = subprocess.run([sys.executable, "-c", "import lora_tools; print(lora_tools.__file__)"],
                               env=tree_env(root), cwd=root, capture_output=True, text=True, check=True)
        if not Path(probe.stdout.strip()).resolve().is_relative_to(root):
            print(f"{label}: lora_tools comes from {probe.stdout.strip()}, not {root}", file=sys.stderr)
            return 2
    times: dict[tuple[str, str], list[float]] = {}
    rss: dict[tuple[str, str], list[float]] = {}
    identical: dict[str, bool] = {}
    reports: dict[str, str] = {}  # inspect's JSON of each tree in this round
    with benchutil.workdir(args.workdir, args.keep, "lora-bench-revisions-") as work:
        benchutil.cached(work / "base", {"shape": args.shape}, lambda d: synthetic.write_base(d, args.shape))
        benchutil.cached(work / "adapter", {"shape": args.shape, "rank": 16}, lambda d: synthetic.write_adapter(d, args.shape))
        benchutil.cached(work / "adapter2", {"shape": args.shape, "rank": 8, "seed": 2},
                         lambda d: synthetic.write_adapter(d, args.shape, rank=8, seed=2))
        for round_index in range(args.rounds):
            for name in args.commands:
                # alternate which tree goes first: the second run of a pair inherits the first's
                # disk writeback and cache state, which favours neither tree over the rounds
                order = list(trees.items()) if round_index % 2 == 0 else list(reversed(trees.items()))
                for label, root in order:
                    out = work / f"{name.split()[0]}-{label}"
                    if name == "verify":
                        out = work / f"merge-{label}"
                    elif not name.startswith("inspect"):
                        benchutil.remove(out, keep=False)
                    measured = benchutil.measure(command(name, work, out), env=tree_env(root), cwd=root)
                    if measured.rc != 0:
                        print(f"{label} {name} failed ({measured.rc}):\n{measured.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    times.setdefault((name, label), []).append(measured.wall_s)
                    rss.setdefault((name, label), []).append(measured.peak_mb or float("nan"))
                    if name.startswith("inspect"):
                        reports[label] = measured.stdout
                if name.startswith("inspect"):
                    identical[name] = identical.get(name, True) and reports["old"] == reports["new"]
                if name in ("merge", "blend"):
                    identical[name] = identical.get(name, True) and same_output(work / f"{name}-old", work / f"{name}-new")
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for name in args.commands:
        old, new = statistics.median(times[(name, "old")]), statistics.median(times[(name, "new")])
        rows.append([
            name, benchutil.fmt(old), benchutil.fmt(new), f"{new / old:.3f}",
            benchutil.fmt(statistics.median(rss[(name, "old")])), benchutil.fmt(statistics.median(rss[(name, "new")])),
            {True: "identical", False: "DIFFERENT"}.get(identical.get(name), "-") if name != "verify" else "-",
        ])
    print(benchutil.table(
        ["command", "old s", "new s", "new/old", "old peak MB", "new peak MB", "output"], rows,
        title=f"{args.shape}, {args.rounds} round(s), medians; old = {trees['old']}",
    ))
    benchutil.write_json(args.json_out, {"rows": rows, "times": {f"{k[0]}-{k[1]}": v for k, v in times.items()},
                                         "machine": benchutil.machine_info(), "command": benchutil.command_line()})
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
