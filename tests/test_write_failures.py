"""Failing and interrupted writes (issue #6): OUT appears complete or not at all.

A disk that fills up (at the header, midway, at the last byte, at flush or fsync, while
copying config files), a rename that fails, and Ctrl-C midway, for merge (one file, a
folder, shards) and blend (PEFT folder, kohya file), with and without an old OUT under
--force: exit 2 (130 for Ctrl-C) with one stderr line, the temporary removed, an old OUT
untouched, the inputs unchanged. In-process through the real entry point, `main()`.

Then the operating system's own failures, in real processes: a file-size limit
(RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails with EFBIG), and SIGKILL, SIGINT and
SIGTERM delivered while the temporary is half written (a hook in the child pauses the
writer there, so the signal always lands mid-write).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lora_tools.io.output_file
import lora_tools.io.stream_writer
from builders import KohyaCase, PeftCase
from lora_tools.cli import main
from lora_tools.errors import LoraToolsError
from lora_tools.formats import load_adapter

TMP_MARKER = ".lora-tools-"


def sha256_tree(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files and folders (those that exist)."""
    digests = {}
    for path in paths:
        if not path.exists():
            continue
        files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def leftovers(out: Path) -> list[str]:
    """Everything beside OUT named after it: temporaries and renamed-aside old copies."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_MARKER}"))


# --------------------------------------------------------------------------- what is written

@dataclass(frozen=True)
class Target:
    """A command that writes OUT; `inputs` must never change."""

    args: tuple[object, ...]  # without -o
    out_name: str  # a file name for file outputs
    inputs: tuple[Path, ...]


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory, llama_plain_case: PeftCase,
            peft_case_factory: Callable[[str], PeftCase], llama_sharded_base_dir: Path,
            kohya_case: KohyaCase) -> dict[str, Target]:
    root = tmp_path_factory.mktemp("write-inputs")
    base = shutil.copytree(llama_plain_case.base_dir, root / "base")
    sharded = shutil.copytree(llama_sharded_base_dir, root / "sharded")
    adapter = shutil.copytree(llama_plain_case.adapter_dir, root / "adapter")
    other = shutil.copytree(peft_case_factory("llama_rslora").adapter_dir, root / "other")
    kohya = shutil.copy(kohya_case.lora_file, root / "kohya.safetensors")
    return {
        "merge_file": Target(("merge", base / "model.safetensors", adapter, "-q"), "merged.safetensors", (base, adapter)),
        # --dtype: config.json is rewritten in the temporary
        "merge_folder": Target(("merge", base, adapter, "-q", "--dtype", "bf16"), "merged", (base, adapter)),
        "merge_sharded": Target(("merge", sharded, adapter, "-q"), "merged", (sharded, adapter)),
        "blend_peft": Target(("blend", adapter, other, "--weight", 0.3), "mix", (adapter, other)),
        "blend_kohya": Target(("blend", Path(kohya), Path(kohya), "--weight", 0.3, "--method", "cat"), "mix.safetensors",
                              (Path(kohya),)),
    }


def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: object) -> tuple[int, str, str]:
    """The console script's `main()` in-process: its exit status, stdout and stderr."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["lora-tools", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


# --------------------------------------------------------------------------- simulated failures

class _Disk:
    """Bytes left on a pretend disk, shared by every file the output module opens."""

    def __init__(self, free: int, error: BaseException | None = None, on_flush: bool = False) -> None:
        self.free, self.written, self.on_flush = free, 0, on_flush
        self.error = error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FileOnDisk:
    """A binary file whose writes fail, like a full disk, once `disk.free` is used up.

    The part that fits is written first (a real write() is partial before ENOSPC).
    """

    def __init__(self, file: Any, disk: _Disk) -> None:
        self._file, self._disk = file, disk

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        room = min(view.nbytes, self._disk.free)
        self._file.write(view[:room])
        self._disk.free -= room
        self._disk.written += room
        if room < view.nbytes:
            raise self._disk.error
        return room

    def flush(self) -> None:
        if self._disk.on_flush:
            raise self._disk.error
        self._file.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _full_disk(monkeypatch: pytest.MonkeyPatch, disk: _Disk) -> None:
    """Route the `open` of the module that opens the streaming writer's files through `disk`."""

    def opened(*args: Any, **kwargs: Any) -> Any:
        return _FileOnDisk(open(*args, **kwargs), disk)

    monkeypatch.setattr(lora_tools.io.output_file, "open", opened, raising=False)


@pytest.fixture(scope="module")
def output_bytes(targets: dict[str, Target], tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """How many bytes each target streams through the writer when nothing fails."""
    sizes = {}
    root = tmp_path_factory.mktemp("sizes")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, target in targets.items():
            disk = _Disk(free=1 << 40)
            _full_disk(monkeypatch, disk)
            monkeypatch.setattr(sys, "argv", ["lora-tools", *map(str, target.args), "-o", str(root / name / target.out_name)])
            (root / name).mkdir()
            with pytest.raises(SystemExit) as done:
                main()
            assert done.value.code == 0
            sizes[name] = disk.written
    return sizes


FAILURES = ("disk_full_at_header", "disk_full_midway", "disk_full_at_last_byte", "disk_full_at_flush", "fsync_eio",
            "config_write", "copying_files", "rename", "ctrl_c_midway")


def _arrange(failure: str, target: Target, total: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Set up one failure; return the expected exit status and stderr words."""
    no_space = "cannot write: No space left on device"
    if failure.startswith("disk_full") or failure == "ctrl_c_midway":
        free = {"disk_full_at_header": 0, "disk_full_at_last_byte": total - 1}.get(failure, total // 2)
        interrupt = failure == "ctrl_c_midway"
        _full_disk(monkeypatch, _Disk(free, KeyboardInterrupt() if interrupt else None))
        return (130, "Error: interrupted") if interrupt else (2, no_space)
    if failure == "disk_full_at_flush":
        _full_disk(monkeypatch, _Disk(1 << 40, on_flush=True))
        return 2, no_space
    if failure == "fsync_eio":
        def fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", fsync)
        return 2, "cannot write: Input/output error"
    if failure == "config_write":  # adapter_config.json, or config.json after --dtype
        real = pathlib.Path.write_text

        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
            if TMP_MARKER in str(self):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        return 2, no_space
    if failure == "copying_files":  # the disk fills while a non-weight file is copied into OUT
        import lora_tools.io.extra_files

        def copy_file(source: Any, target: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(lora_tools.io.extra_files, "_copy_file", copy_file)
        return 2, no_space
    if failure == "rename":  # publishing the finished temporary fails (EXDEV, EACCES, ...)
        real_replace = os.replace

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            if f"{TMP_MARKER}tmp-" in os.fspath(src):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        return 2, "cannot write: Invalid cross-device link"
    raise ValueError(failure)


# config_write only where a JSON file is written into the temporary, copying_files only
# where the base's other files are copied.
_WRITES_CONFIG, _COPIES_FILES = ("merge_folder", "blend_peft"), ("merge_folder", "merge_sharded")
CASES = [(name, failure) for name in ("merge_file", "merge_folder", "merge_sharded", "blend_peft", "blend_kohya")
         for failure in FAILURES
         if (failure != "config_write" or name in _WRITES_CONFIG) and (failure != "copying_files" or name in _COPIES_FILES)]


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize(("name", "failure"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_failed_write_leaves_nothing(targets: dict[str, Target], output_bytes: dict[str, int], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                     name: str, failure: str, force: bool) -> None:
    target = targets[name]
    out = tmp_path / target.out_name
    if force:
        _old_out(out)
    before = sha256_tree(*target.inputs, out)
    code_wanted, words = _arrange(failure, target, output_bytes[name], monkeypatch)
    code, stdout, stderr = run_main(capsys, monkeypatch, *target.args, "-o", out, *(["--force"] if force else []))
    monkeypatch.undo()
    assert (code, stdout) == (code_wanted, ""), stderr
    assert stderr.count("\n") == 1 and words in stderr and "Traceback" not in stderr, stderr
    if code == 2:
        assert stderr.startswith(f"Error: {out}: "), stderr
    assert out.exists() == force
    assert sha256_tree(*target.inputs, out) == before
    assert leftovers(out) == []


def test_rename_failure_puts_the_old_folder_back(targets: dict[str, Target], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--force over a folder renames the old one aside first; if the new one then cannot be
    moved in, the old one goes back under its name."""
    target = targets["merge_folder"]
    out = tmp_path / "merged"
    _old_out(out)
    real_replace = os.replace
    moves: list[tuple[str, str]] = []

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        moves.append((Path(src).name, Path(dst).name))
        if f"{TMP_MARKER}tmp-" in os.fspath(src):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    code, _, stderr = run_main(capsys, monkeypatch, *target.args, "-o", out, "--force")
    monkeypatch.undo()
    assert code == 2 and "cannot write: Permission denied" in stderr
    aside, publish, back = moves  # the old folder aside, the new one in (fails), the old one back
    assert aside[0] == "merged" and f"{TMP_MARKER}old-" in aside[1]
    assert f"{TMP_MARKER}tmp-" in publish[0] and publish[1] == "merged"
    assert back == (aside[1], "merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "old.txt"] and leftovers(out) == []


# --------------------------------------------------------------------------- real processes

def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing us

    return preexec


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("name", ["merge_file", "merge_folder", "blend_peft"])
def test_file_size_limit_in_a_real_process(targets: dict[str, Target], output_bytes: dict[str, int], tmp_path: Path,
                                           name: str, force: bool) -> None:
    """The kernel refuses to grow a file past RLIMIT_FSIZE: a real failing write(2)."""
    target = targets[name]
    out = tmp_path / target.out_name
    if force:
        out.mkdir()
        (out / "config.json").write_text("{}")  # an earlier lora-tools output, which --force may replace
        (out / "old.txt").write_text("old output")
    before = sha256_tree(*target.inputs, out)
    limit = output_bytes[name] // 3
    assert limit > 8192  # above every other file written (config.json, .pyc)
    command = [sys.executable, "-m", "lora_tools", *map(str, target.args), "-o", str(out), *(["--force"] if force else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(limit),
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == f"Error: {out}: cannot write: File too large\n"
    assert out.exists() == force and sha256_tree(*target.inputs, out) == before
    assert leftovers(out) == []


# A child that pauses the streaming writer after its header and first tensor, tells the
# test (a ready file), and sleeps: the signal then lands with the temporary half written.
_PAUSED_CHILD = r"""
import sys, time
import lora_tools.io.stream_writer as output
ready, args = sys.argv[1], sys.argv[2:]
write, calls = output.SafetensorsStreamWriter._raw_write, [0]

def paused(self, view):
    write(self, view)
    calls[0] += 1
    if calls[0] == 2:
        open(ready, "w").close()
        time.sleep(120)

output.SafetensorsStreamWriter._raw_write = paused
sys.argv = ["lora-tools", *args]
from lora_tools.cli import main
main()
"""


@dataclass(frozen=True)
class Killed:
    returncode: int
    stderr: str
    out: Path
    before: dict[str, str]
    left: list[str]


def _old_out(out: Path) -> None:
    """An OUT from an earlier run, for --force to replace (a folder --force may replace:
    it holds what lora-tools writes, issue #12)."""
    if out.suffix:
        out.write_bytes(b"old output")
    else:
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "old.txt").write_text("old output")


def _kill_midway(target: Target, folder: Path, sig: int, force: bool) -> Killed:
    out = folder / target.out_name
    if force:
        _old_out(out)
    before = sha256_tree(*target.inputs, out)
    ready = folder / "ready"
    command = [sys.executable, "-c", _PAUSED_CHILD, str(ready), *map(str, target.args), "-o", str(out),
               *(["--force"] if force else [])]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.01)
        assert leftovers(out), "no temporary while writing"
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    ready.unlink()
    return Killed(child.returncode, stderr, out, before, leftovers(out))


SIGNALS = [
    ("blend_peft", signal.SIGKILL, False), ("blend_peft", signal.SIGKILL, True),
    ("blend_peft", signal.SIGINT, False), ("blend_peft", signal.SIGINT, True),
    ("blend_peft", signal.SIGTERM, True), ("blend_kohya", signal.SIGKILL, True),
    ("merge_folder", signal.SIGKILL, True),
]


@pytest.mark.parametrize(("name", "sig", "force"), SIGNALS,
                         ids=[f"{n}-{signal.Signals(s).name}-{'force' if f else 'new'}" for n, s, f in SIGNALS])
def test_signal_while_writing(targets: dict[str, Target], tmp_path: Path, name: str, sig: int, force: bool) -> None:
    target = targets[name]
    killed = _kill_midway(target, tmp_path, sig, force)
    assert killed.out.exists() == force
    assert sha256_tree(*target.inputs, killed.out) == killed.before  # old OUT and inputs untouched
    if sig == signal.SIGKILL:  # nothing can clean up: a hidden, incomplete temporary may stay
        assert killed.returncode == -signal.SIGKILL
        assert len(killed.left) == 1 and killed.left[0].startswith(f".{killed.out.name}{TMP_MARKER}tmp-")
        if name.startswith("blend"):  # it cannot be mistaken for an adapter
            with pytest.raises(LoraToolsError):
                load_adapter(tmp_path / killed.left[0])
    else:
        assert killed.returncode == 128 + sig
        assert killed.stderr == ("Error: interrupted\n" if sig == signal.SIGINT else "Error: terminated\n")
        assert killed.left == []


def test_rerun_after_sigkill_succeeds(targets: dict[str, Target], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A temporary left by SIGKILL neither blocks nor leaks into the next run."""
    target = targets["blend_peft"]
    killed = _kill_midway(target, tmp_path, signal.SIGKILL, force=False)
    assert len(killed.left) == 1
    code, _, stderr = run_main(capsys, monkeypatch, *target.args, "-o", killed.out)
    assert code == 0, stderr
    assert sorted(p.name for p in killed.out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert load_adapter(killed.out).layers
