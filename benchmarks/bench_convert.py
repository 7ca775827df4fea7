"""Benchmark `lora-tools convert` in every direction, against the I/O floor and the peers.

A PEFT adapter with Llama-3.2-1B shapes (r=16 on all seven projections of 16 layers: 112
modules, bf16) and its base (for the directions that need one: kohya names, GGUF) are
generated, then, in one run (best of --repeat, wall time including interpreter start-up):

  python -c pass                                   interpreter start-up
  cp the adapter file                              the I/O floor of writing it once
  lora-tools convert A --to kohya / diffusers / peft / gguf, and back from kohya and
  diffusers to PEFT (kohya with --base): every output is read back and proven
  diffusers' convert_state_dict_to_kohya          peer for PEFT → kohya (torch load, convert,
                                                   save; no alpha rule, no proof)
  llama.cpp's convert_lora_to_gguf.py              peer for PEFT → GGUF, with --llama-cpp DIR
                                                   (a llama.cpp source tree; one global alpha)

Each lora-tools run is also checked for importing torch (it must not, except where the
target needs it). Target: every direction ≤ 0.5 s wall on the 2-core box.

    PYTHONPATH=. python3 benchmarks/bench_convert.py [--repeat 5] [--llama-cpp DIR] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
import synthetic  # noqa: E402

TARGET_WALL_S = 0.5

_TORCH_PROBE = """
import contextlib, io, sys
sys.argv = ["lora-tools", *sys.argv[1:]]
from lora_tools.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main()
    except SystemExit as stop:
        assert not stop.code, stop.code
print("torch" in sys.modules)
"""

_DIFFUSERS_PEER = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
state = load_file(sys.argv[1])
save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, sys.argv[2])
"""


def _fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bu.common_arguments(parser, shapes=("tiny", "1b"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="a llama.cpp source tree: time its convert_lora_to_gguf.py")
    args = parser.parse_args(argv)
    spec = synthetic.get_shape(args.shape)
    results: dict[str, Any] = {"benchmark": "convert", "command": bu.command_line(), "machine": bu.machine_info(),
                               "shape": spec.name, "rank": args.rank}
    with bu.workdir(args.workdir, args.keep, "lora-bench-convert-") as work:
        base = work / f"base-{spec.name}"
        bu.cached(base, {"shape": spec.name, "seed": 0}, lambda p: synthetic.write_base(p, spec))
        adapter = work / f"adapter-{spec.name}-r{args.rank}-bf16"
        bu.cached(adapter, {"shape": spec.name, "rank": args.rank, "dtype": "bf16", "seed": 1},
                  lambda p: synthetic.write_adapter(p, spec, rank=args.rank, dtype="bf16"))
        kohya, diffusers = work / "kohya.safetensors", work / "diffusers.safetensors"
        directions = [
            ("PEFT → kohya", [adapter, "--to", "kohya", "-o", kohya]),
            ("PEFT → diffusers", [adapter, "--to", "diffusers", "--prefix", "transformer", "-o", diffusers]),
            ("PEFT → PEFT", [adapter, "--to", "peft", "-o", work / "peft"]),
            ("kohya → PEFT (--base)", [kohya, "--to", "peft", "--base", base, "-o", work / "from-kohya"]),
            ("diffusers → PEFT", [diffusers, "--to", "peft", "-o", work / "from-diffusers"]),
            ("PEFT → GGUF (--base)", [adapter, "--to", "gguf", "--base", base, "-o", work / "adapter.gguf"]),
        ]
        floor, _ = bu.best_of([sys.executable, "-c", "pass"], args.repeat)
        copy, _ = bu.best_of(["cp", adapter / "adapter_model.safetensors", work / "copy.safetensors"], args.repeat)
        rows: list[list[Any]] = [["python -c pass (start-up floor)", floor.wall_s, "", ""],
                                 ["cp adapter_model.safetensors (I/O floor)", copy.wall_s, "", ""]]
        walls = {}
        for label, cli_args in directions:
            out = Path(cli_args[cli_args.index("-o") + 1])
            runs = []
            for _ in range(args.repeat):
                _fresh(out)
                run = bu.measure(bu.lora_tools("convert", *map(str, cli_args), "--json"), check=True)
                runs.append(run)
            best = min(runs, key=lambda r: r.wall_s)
            report = json.loads(best.stdout)
            if not report["exact"]:
                raise SystemExit(f"{label}: not exact ({report['first_difference']})")
            _fresh(out)
            probe = subprocess.run([sys.executable, "-c", _TORCH_PROBE, "convert", *map(str, cli_args)],
                                   capture_output=True, text=True, env=bu.child_env(), cwd=bu.REPO_ROOT, check=True)
            torch_imported = probe.stdout.strip().splitlines()[-1] == "True"
            walls[label] = best.wall_s
            rows.append([f"lora-tools convert {label}", best.wall_s, "yes" if torch_imported else "no",
                         f"{best.wall_s / copy.wall_s:.1f}"])
            print(f"{label}: {best.wall_s:.3f} s best of {args.repeat}, peak RSS {bu.fmt(best.peak_mb)} MB, "
                  f"torch imported: {torch_imported}", flush=True)
        peer, _ = bu.best_of([sys.executable, "-c", _DIFFUSERS_PEER, adapter / "adapter_model.safetensors",
                              work / "peer-kohya.safetensors"], args.repeat)
        rows.append(["peer: diffusers convert_state_dict_to_kohya (PEFT → kohya)", peer.wall_s, "yes",
                     f"{peer.wall_s / copy.wall_s:.1f}"])
        results["diffusers_peer_s"] = peer.wall_s
        if args.llama_cpp is not None:
            script = args.llama_cpp / "convert_lora_to_gguf.py"
            gguf_peer, _ = bu.best_of([sys.executable, script, adapter, "--base", base, "--outfile", work / "peer.gguf",
                                       "--outtype", "bf16"], args.repeat)
            rows.append(["peer: llama.cpp convert_lora_to_gguf.py (PEFT → GGUF)", gguf_peer.wall_s, "yes",
                         f"{gguf_peer.wall_s / copy.wall_s:.1f}"])
            results["llama_cpp_peer_s"] = gguf_peer.wall_s
        print()
        print(bu.table(["variant", "seconds", "torch", "× cp"], rows,
                       title=f"convert: {spec.name} shapes, r={args.rank}, bf16, {2 * 16 * 7 if spec.name == '1b' else ''} tensors"))
        worst = max(walls.values())
        print(f"\nslowest direction {worst:.3f} s (target ≤ {TARGET_WALL_S} s on the 2-core box); "
              f"PEFT → kohya {results['diffusers_peer_s'] / walls['PEFT → kohya']:.1f}× faster than diffusers' converter")
        results.update({"walls_s": walls, "startup_floor_s": floor.wall_s, "copy_floor_s": copy.wall_s})
        bu.write_json(args.json_out, results)
    return 0 if worst <= TARGET_WALL_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
