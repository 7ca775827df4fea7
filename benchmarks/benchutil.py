"""What every bench_*.py script shares: work folders, measured subprocesses, tables, JSON.

Measured subprocess: wall time from fork to reap; while it runs a thread reads
/proc/<pid>/status every ~20 ms for VmRSS (resident), RssAnon (anonymous resident:
heap, numpy/torch buffers; page cache mapped from files does not count) and VmHWM (the
kernel's own resident high-water mark, read until the process exits). os.wait4's
ru_maxrss is the kernel's peak RSS too, kept as a cross-check of the polled figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000  # decimal megabytes everywhere (memory too: /proc kB × 1024 / 1e6)


# -- command line --------------------------------------------------------------------------

def common_arguments(parser: argparse.ArgumentParser, *, shapes: Sequence[str] | None = ("tiny", "1b", "8b"),
                     default_shape: str = "1b") -> None:
    parser.add_argument("--source-only", action="store_true",
                        help="do not byte-compile lora_tools first (every run then compiles it from source "
                             "where PYTHONDONTWRITEBYTECODE is set)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where inputs and outputs go (default: a new temp dir under /tmp, deleted at the end)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (and every variant's output) at the end")
    parser.add_argument("--json-out", type=Path, default=None, help="write the results as JSON to this file")
    if shapes:
        parser.add_argument("--shape", default=default_shape, choices=list(shapes),
                            help=f"model shapes (default {default_shape})")


@contextlib.contextmanager
def workdir(path: Path | None, keep: bool, prefix: str) -> Iterator[Path]:
    """A given --workdir is created if missing and deleted at the end only if this run
    created it and --keep is not set; the default temp dir likewise. An existing
    --workdir is left in place (its generated inputs are reused by the next run)."""
    created = False
    if path is None:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        created = True
    elif not path.exists():
        path.mkdir(parents=True)
        created = True
    path = path.resolve()

    def terminated(signum: int, frame: Any) -> None:  # unwind (and clean up) on SIGTERM too
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield path
    finally:
        signal.signal(signal.SIGTERM, previous)
        if created and not keep:
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"\nwork folder kept: {path}")


def remove(path: Path, keep: bool) -> None:
    if keep:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- cached synthetic inputs ---------------------------------------------------------------

def cached(folder: Path, recipe: dict[str, Any], make: Any) -> dict[str, Any]:
    """Build `folder` with make(folder) unless it holds a marker for the same recipe."""
    marker = folder.parent / f".{folder.name}.recipe.json"
    if folder.exists() and marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("recipe") == recipe:
            info = saved["info"]
            info["reused"] = True
            return info
    if folder.exists():
        shutil.rmtree(folder)
    info = make(folder)
    info = asdict(info) if hasattr(info, "__dataclass_fields__") else dict(info)
    marker.write_text(json.dumps({"recipe": recipe, "info": info}))
    info["reused"] = False
    return info


# -- subprocesses --------------------------------------------------------------------------

_COMPILED: set[Path] = set()


def compile_package(root: Path = REPO_ROOT) -> None:
    """Byte-compile lora_tools once (__pycache__, git-ignored), as `pip install` does and
    as Python does on an installed copy's first import. Why: a sandbox that sets
    PYTHONDONTWRITEBYTECODE, with an editable install, would otherwise have every timed
    run compile the whole package from source (~40–60 ms), which no user's second run
    pays. `--source-only` in a script's arguments keeps that cost in (both are reported
    in docs/benchmarks.md where it matters). `root`: another checkout (bench_revisions)."""
    if root in _COMPILED or "--source-only" in sys.argv:
        return
    import compileall

    compileall.compile_dir(str(root / "lora_tools"), quiet=1)
    _COMPILED.add(root)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: the repo root first on PYTHONPATH, so that
    `python -m lora_tools` runs this checkout even where the package is not installed
    (compiled first: `compile_package`)."""
    compile_package()
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def lora_tools(*args: str) -> list[str]:
    return [sys.executable, "-m", "lora_tools", *map(str, args)]


def _status_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith((b"VmRSS:", b"RssAnon:", b"RssFile:", b"RssShmem:", b"VmHWM:")):
                    key, value = line.split(b":", 1)
                    values[key.decode()] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        pass
    return values


# The measured command is started by this small helper, not by the benchmark itself: a
# child forked from a big parent inherits the parent's RSS as its ru_maxrss (Linux keeps
# the high-water mark across fork and exec), so wait4 on it would report the benchmark's
# own size for a small child. The helper (a bare interpreter, ~10 MB) forks, execs, reaps
# the command and writes its pid, exit status, ru_maxrss and wall time to a status file.
_SPAWN = r"""
import json, os, sys, time
status = sys.argv[1]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        os.write(2, f"cannot run {sys.argv[2]}: {exc}\n".encode())
        os._exit(127)
with open(status + ".pid", "w") as handle:
    handle.write(str(pid))
_, code, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(status, "w") as handle:
    json.dump({"rc": os.waitstatus_to_exitcode(code), "maxrss_kb": usage.ru_maxrss, "wall_s": wall}, handle)
"""


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    wall_s: float  # from fork to reap, measured by the spawn helper
    peak_rss_mb: float | None  # polled VmRSS
    peak_anon_mb: float | None  # polled RssAnon
    hwm_mb: float | None  # VmHWM, last value read before exit
    maxrss_mb: float | None  # os.wait4 ru_maxrss
    samples: int
    # Where the memory went: at the sample with the highest VmRSS, its parts in MB
    # (RssAnon, RssFile: mapped files such as the CUDA libraries, RssShmem: pinned
    # memory), the second at which anonymous memory peaked, and a coarse timeline
    # (seconds, VmRSS MB, RssAnon MB; at most TIMELINE_POINTS, the peaks kept).
    at_peak_rss: dict[str, float] = field(default_factory=dict)
    peak_anon_at_s: float | None = None
    timeline: list[tuple[float, float, float]] = field(repr=False, default_factory=list)
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    @property
    def rss_parts(self) -> str:
        """The parts of RSS at its peak, for a progress line: "RssAnon 502, RssFile 88, ..."."""
        return ", ".join(f"{k} {v:.0f}" for k, v in self.at_peak_rss.items())

    @property
    def peak_mb(self) -> float | None:
        """The best peak-RSS figure: the kernel's (ru_maxrss / VmHWM), else the polled."""
        kernel = [v for v in (self.maxrss_mb, self.hwm_mb) if v is not None]
        return max(kernel) if kernel else self.peak_rss_mb

    def as_dict(self, keep_output: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not keep_output:
            data["stdout"] = data["stdout"][-2000:]
            data["stderr"] = data["stderr"][-2000:]
        data["peak_mb"] = self.peak_mb
        return data


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
            poll_s: float = 0.02, timeout_s: float | None = None, check: bool = False) -> Measured:
    """Run `cmd` (no shell) and measure wall time and memory; see the module docstring."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="lora-bench-spawn-") as tmp:
        status_path = os.path.join(tmp, "status.json")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SPAWN, status_path, *cmd],
                                stdout=out, stderr=err, env=env or child_env(), cwd=cwd)
        peaks = {"VmRSS": 0, "RssAnon": 0, "VmHWM": 0}
        samples = 0
        at_peak_rss: dict[str, float] = {}
        timeline: list[tuple[float, float, float]] = []
        started = time.perf_counter()
        stop = threading.Event()

        def poll() -> None:
            nonlocal samples, at_peak_rss
            pid = None
            while not stop.is_set():
                if pid is None:
                    with contextlib.suppress(OSError, ValueError):
                        pid = int(Path(status_path + ".pid").read_text())
                if pid is not None:
                    values = _status_kb(pid)
                    if values:
                        samples += 1
                        if values.get("VmRSS", 0) > peaks["VmRSS"]:
                            at_peak_rss = {k: v * 1024 / MB for k, v in values.items() if k.startswith("Rss")}
                        for key in peaks:
                            peaks[key] = max(peaks[key], values.get(key, 0))
                        timeline.append((time.perf_counter() - started, values.get("VmRSS", 0) * 1024 / MB,
                                         values.get("RssAnon", 0) * 1024 / MB))
                stop.wait(poll_s if pid is not None else 0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(status_path + ".pid").read_text()), 9)
            proc.wait()
        finally:
            stop.set()
            thread.join()
        try:
            status = json.loads(Path(status_path).read_text())
        except (OSError, ValueError):
            status = {"rc": proc.returncode if proc.returncode else -1, "maxrss_kb": 0, "wall_s": float("nan")}
        out.seek(0)
        err.seek(0)
        result = Measured(
            cmd=cmd, rc=int(status["rc"]), wall_s=float(status["wall_s"]),
            peak_rss_mb=peaks["VmRSS"] * 1024 / MB if peaks["VmRSS"] else None,
            peak_anon_mb=peaks["RssAnon"] * 1024 / MB if peaks["RssAnon"] else None,
            hwm_mb=peaks["VmHWM"] * 1024 / MB if peaks["VmHWM"] else None,
            maxrss_mb=status["maxrss_kb"] * 1024 / MB if status.get("maxrss_kb") else None,
            samples=samples,
            at_peak_rss=at_peak_rss,
            peak_anon_at_s=max(timeline, key=lambda point: point[2])[0] if timeline else None,
            timeline=_thinned(timeline),
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )
    if check and result.rc != 0:
        raise RuntimeError(f"command failed with exit status {result.rc}: {' '.join(cmd)}\n{result.stderr[-4000:]}")
    return result


TIMELINE_POINTS = 200


def _thinned(timeline: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """Every k-th sample, plus the samples of peak RSS and peak anonymous memory."""
    if not timeline:
        return []
    keep = set(range(0, len(timeline), math.ceil(len(timeline) / TIMELINE_POINTS)))
    keep.add(max(range(len(timeline)), key=lambda i: timeline[i][1]))
    keep.add(max(range(len(timeline)), key=lambda i: timeline[i][2]))
    return [tuple(round(v, 3) for v in timeline[i]) for i in sorted(keep)]  # type: ignore[misc]


def best_of(cmd: Sequence[str], n: int, **kwargs: Any) -> tuple[Measured, list[float]]:
    """Run `cmd` n times; the fastest run (by wall time) and every wall time."""
    runs = [measure(cmd, **kwargs) for _ in range(n)]
    for run in runs:
        if run.rc != 0:
            raise RuntimeError(f"exit status {run.rc}: {' '.join(run.cmd)}\n{run.stderr[-4000:]}")
    return min(runs, key=lambda r: r.wall_s), [r.wall_s for r in runs]


def sync_seconds() -> float:
    """os.sync() (flush every dirty page to disk) and how long it took."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


# -- reporting -----------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.{digits - 1}f}".rstrip("0").rstrip(".") if digits > 1 else f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A Markdown table (readable in a terminal, pastable into docs)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "lora_tools_bytecode": "source only" if "--source-only" in sys.argv else "compiled (compile_package)",
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    for module in ("numpy", "safetensors", "peft", "transformers"):
        with contextlib.suppress(Exception):
            info[module] = __import__(module).__version__
    with contextlib.suppress(Exception):  # read-only git queries (no index refresh)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            info["git_commit"] = head.stdout.strip()
            changed = subprocess.run(
                ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "lora_tools"],
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
            )
            if changed.returncode == 0:
                info["lora_tools_uncommitted_files"] = len(changed.stdout.splitlines())
    return info


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"results written to {path}")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
