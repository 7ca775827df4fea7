"""Hostile output paths and signals (issue #12): what -o / --plot may write and --force may replace.

OUT is compared with the inputs and the current folder by identity (device, inode), not as
a string, so a symlinked or bind-mounted alias of an input is refused. --force replaces only
what lora-tools could have written (a model or adapter folder, a .safetensors file), never
the current folder or a folder above it. A stop signal during --force's replacement is held
back until OUT is in place and then reported truthfully; SIGHUP and SIGQUIT are handled like
SIGTERM. Each refusal: exit 2, one stderr line naming the path, nothing written or removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builders import PeftCase
from cli_run import run_cli
from lora_tools.errors import RequestError, Terminated
from lora_tools.io import atomic
from lora_tools.io.atomic import OLD_MARKER, TMP_MARKER, atomic_output

MARKERS = (TMP_MARKER, OLD_MARKER)


def digests(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files and folders (names included)."""
    found = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if any(m in p.name for m in MARKERS))


def refused(*args: object, says: tuple[str, ...] = (), culprit: object = None) -> str:
    code, stdout, stderr = run_cli(*args)
    assert code == 2 and stdout == "", (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    if culprit is not None:
        assert str(culprit) in lines[0], lines[0]
    for words in says:
        assert words in lines[0], (words, lines[0])
    return lines[0]


@dataclass(frozen=True)
class Work:
    """A private copy of the llama base and adapter under `root` (the fixtures are shared)."""

    root: Path
    base: Path
    adapter: Path


@pytest.fixture
def work(llama_plain_case: PeftCase, tmp_path: Path) -> Work:
    root = tmp_path / "w"
    root.mkdir()
    base = shutil.copytree(llama_plain_case.base_dir, root / "base")
    adapter = shutil.copytree(llama_plain_case.adapter_dir, root / "adapter")
    return Work(root, Path(base), Path(adapter))


# --------------------------------------------------------------------------- 1. overlap by identity

@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_out_through_a_symlinked_folder_is_the_base(work: Work, tmp_path: Path, force: bool) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(work.root, target_is_directory=True)
    before = digests(work.root)
    for out in (alias / "base", alias / "base" / "merged", alias):  # the base, inside it, holding it
        refused("merge", work.base, work.adapter, "-o", out, *(["--force"] if force else []),
                says=("overlaps the input",), culprit=out)
    assert digests(work.root) == before and hidden(work.root) == []


def test_out_through_a_bind_mount_is_the_base(work: Work, tmp_path: Path) -> None:
    """Two strings, one inode, no symlink to resolve: only an identity check sees it."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", str(work.root), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        assert (mount / "base").resolve() == mount / "base"  # resolve() cannot tell
        before = digests(work.root)
        refused("merge", work.base, work.adapter, "-o", mount / "base", "--force", says=("overlaps the input",))
        refused("merge", work.base, work.adapter, "-o", mount, "--force", says=("overlaps the input",))
        assert digests(work.root) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_hard_link_to_an_input_file_is_still_replaceable(work: Work) -> None:
    """Same inode, another name: replacing the link leaves the base's bytes alone (as before)."""
    base_file = work.base / "model.safetensors"
    link = work.root / "merged.safetensors"
    os.link(base_file, link)
    before = digests(work.base)
    code, _, stderr = run_cli("merge", base_file, work.adapter, "-o", link, "--force", "-q")
    assert code == 0, stderr
    assert digests(work.base) == before and os.stat(link).st_ino != os.stat(base_file).st_ino


# --------------------------------------------------------------------------- 2. what --force may replace

def test_force_never_replaces_the_current_folder(work: Work, monkeypatch: pytest.MonkeyPatch) -> None:
    here = work.root.parent / "here"
    (here / "sub").mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here / "sub")
    before = digests(here)
    for out in (".", "..", str(here / "sub")):
        refused("merge", work.base, work.adapter, "-o", out, "--force", says=("current folder",))
    assert digests(here) == before and hidden(here) == [] and hidden(here / "sub") == []


def test_empty_out_is_refused(work: Work, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work.root)
    before = digests(work.root)
    refused("merge", work.base, work.adapter, "-o", "", "--force")
    refused("blend", work.adapter, work.adapter, "--weight", 0.5, "-o", "", "--force", says=("empty",))
    assert digests(work.root) == before and hidden(work.root) == []


def test_force_refuses_a_folder_lora_tools_did_not_write(work: Work) -> None:
    out = work.root / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = refused("merge", work.base, work.adapter, "-o", out, "--force", culprit=out,
                   says=("keep.txt", "lora-tools did not write", "refusing to replace"))
    assert "--force" not in line
    (out / "more.txt").write_text("also")
    refused("blend", work.adapter, work.adapter, "--weight", 0.5, "-o", out, "--force", says=("keep.txt and 1 other",))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "more.txt"] and hidden(work.root) == []


@pytest.mark.parametrize("earlier", ["model", "adapter", "empty"])
def test_force_replaces_an_earlier_output(work: Work, earlier: str) -> None:
    out = work.root / "out"
    out.mkdir()
    if earlier == "model":
        (out / "config.json").write_text("{}")
        (out / "tokenizer.json").write_text("{}")
    elif earlier == "adapter":
        (out / "adapter_config.json").write_text("{}")
    code, _, stderr = run_cli("merge", work.base, work.adapter, "-o", out, "--force", "-q")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in work.base.iterdir())
    assert hidden(work.root) == []


def test_force_replaces_only_a_safetensors_file(work: Work) -> None:
    base_file = work.base / "model.safetensors"
    notes = work.root / "notes.txt"
    notes.write_text("mine")
    refused("merge", base_file, work.adapter, "-o", notes, "--force", culprit=notes, says=("not .safetensors",))
    assert notes.read_text() == "mine"
    old = work.root / "old.safetensors"
    old.write_bytes(b"an earlier output")
    code, _, stderr = run_cli("merge", base_file, work.adapter, "-o", old, "--force", "-q")
    assert code == 0, stderr
    assert old.read_bytes() != b"an earlier output" and hidden(work.root) == []


def test_parent_that_is_a_file(work: Work) -> None:
    afile = work.root / "afile"
    afile.write_text("x")
    line = refused("merge", work.base, work.adapter, "-o", afile / "out", culprit=afile, says=("is not a folder",))
    assert "does not exist" not in line


# --------------------------------------------------------------------------- 16. long names

def test_out_name_near_the_file_name_limit(work: Work) -> None:
    for length in (240, 255):
        out = work.root / ("m" * (length - len(".safetensors")) + ".safetensors")
        code, _, stderr = run_cli("merge", work.base / "model.safetensors", work.adapter, "-o", out, "-q")
        assert code == 0, stderr
        folder = work.root / ("f" * length)
        code, _, stderr = run_cli("blend", work.adapter, work.adapter, "--weight", 0.5, "-o", folder)
        assert code == 0, stderr
        code, _, stderr = run_cli("blend", work.adapter, work.adapter, "--weight", 0.5, "-o", folder, "--force")
        assert code == 0, stderr  # the old folder's side name fits too
    assert hidden(work.root) == []


def test_temporary_names_fit_and_differ(tmp_path: Path) -> None:
    out = tmp_path / ("é" * 127)  # 254 bytes of UTF-8
    names = {atomic._sibling(out, TMP_MARKER).name for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert len(os.fsencode(name)) <= 255 and name.startswith(".é") and TMP_MARKER in name
        name.encode("utf-8")  # cut on a character boundary


# --------------------------------------------------------------------------- 4. signals during the replacement

def _interrupting_replace(sig: int) -> None:
    """os.replace in atomic, but the signal arrives between the two renames of --force."""
    real = os.replace

    def replace(src: object, dst: object) -> None:
        real(src, dst)  # type: ignore[arg-type]
        if OLD_MARKER in os.fspath(dst):  # type: ignore[arg-type]
            os.kill(os.getpid(), sig)
            time.sleep(0.05)

    atomic.os.replace = replace  # type: ignore[attr-defined]


@pytest.fixture
def restored_replace() -> Iterator[None]:
    real = os.replace
    yield
    os.replace = real


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_between_the_renames_is_held_back(tmp_path: Path, restored_replace: None, sig: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    before = {s: signal.getsignal(s) for s in atomic.STOP_SIGNALS}
    _interrupting_replace(sig)
    with pytest.raises(Terminated) as caught:
        with atomic_output(out, force=True) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("new")
    assert caught.value.code == 128 + sig and caught.value.written == str(out)
    assert (out / "config.json").read_text() == "new" and hidden(tmp_path) == []
    assert {s: signal.getsignal(s) for s in atomic.STOP_SIGNALS} == before


_CHILD = r"""
import os, signal, sys, time
import lora_tools.io.atomic as atomic
when, sig, args = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3:]
real_replace, real_output = os.replace, atomic.atomic_output

def replace(src, dst):
    real_replace(src, dst)
    if when == "between" and atomic.OLD_MARKER in os.fspath(dst):
        os.kill(os.getpid(), sig)
        time.sleep(0.2)

import contextlib
@contextlib.contextmanager
def output(*a, **k):
    if when == "before":
        os.kill(os.getpid(), sig)
        time.sleep(5)
    with real_output(*a, **k) as tmp:
        yield tmp
        if when == "writing":
            os.kill(os.getpid(), sig)
            time.sleep(5)
    if when == "after":
        os.kill(os.getpid(), sig)
        time.sleep(5)

atomic.os.replace = replace
atomic.atomic_output = output
sys.argv = ["lora-tools", *args]
from lora_tools.cli import main
main()
"""


def _child(when: str, sig: int, *args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _CHILD, when, signal.Signals(sig).name, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT])
def test_cli_signal_between_the_renames(work: Work, sig: int) -> None:
    out = work.root / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    done = _child("between", sig, "merge", work.base, work.adapter, "-o", out, "--force", "-q")
    assert done.returncode == 128 + sig, done.stderr
    assert done.stderr.count("\n") == 1 and f"after the output was written: {out}" in done.stderr, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in work.base.iterdir())
    assert hidden(work.root) == []


def test_ctrl_c_right_after_out_was_published(work: Work) -> None:
    out = work.root / "merged"
    done = _child("after", signal.SIGINT, "merge", work.base, work.adapter, "-o", out, "-q")
    assert done.returncode == 130 and done.stderr == f"Error: interrupted after the output was written: {out}\n"
    assert (out / "model.safetensors").is_file() and hidden(work.root) == []


# --------------------------------------------------------------------------- 9. SIGHUP, SIGQUIT, early SIGTERM

@pytest.mark.parametrize(("sig", "line"), [
    (signal.SIGHUP, "Error: terminated by SIGHUP\n"),
    (signal.SIGQUIT, "Error: terminated by SIGQUIT\n"),
    (signal.SIGTERM, "Error: terminated\n"),
])
@pytest.mark.parametrize("when", ["before", "writing"])
def test_stop_signals_are_reported_and_clean_up(work: Work, sig: int, line: str, when: str) -> None:
    out = work.root / "mix"
    before = digests(work.adapter)
    done = _child(when, sig, "blend", work.adapter, work.adapter, "--weight", 0.5, "-o", out)
    assert (done.returncode, done.stderr) == (128 + sig, line)
    assert not out.exists() and hidden(work.root) == [] and digests(work.adapter) == before


# --------------------------------------------------------------------------- 5. inspect --plot

def test_plot_never_replaces_an_existing_file_without_force(work: Work) -> None:
    notes = work.root / "notes.txt"
    notes.write_text("mine")
    photo = work.root / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"someone else's image")
    for target in (notes, photo):
        refused("inspect", work.adapter, "--plot", target, culprit=target, says=("already exists", "--force"))
    assert notes.read_text() == "mine" and photo.read_bytes().endswith(b"someone else's image")
    code, _, stderr = run_cli("inspect", work.adapter, "--plot", notes, "--force")
    assert code == 0, stderr
    assert notes.read_bytes().startswith(b"\x89PNG") and hidden(work.root) == []
    code, _, stderr = run_cli("inspect", work.adapter, "--plot", notes)  # now an earlier plot
    assert code == 0, stderr


def test_plot_never_replaces_an_input_even_with_force(work: Work, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(work.root, target_is_directory=True)
    before = digests(work.root)
    weights = work.adapter / "adapter_model.safetensors"
    for target in (work.base / "model.safetensors", weights, alias / "adapter" / "adapter_config.json",
                   alias / "base" / "config.json", work.adapter):
        refused("inspect", work.adapter, "--base", work.base, "--plot", target, "--force",
                culprit=target, says=("would overwrite the input",))
    refused("inspect", weights, "--plot", alias / "adapter" / "adapter_model.safetensors", "--force",
            says=("would overwrite the input",))
    assert digests(work.root) == before and hidden(work.root) == []


def test_plot_into_a_folder_is_refused(work: Work) -> None:
    folder = work.root / "plots"
    folder.mkdir()
    refused("inspect", work.adapter, "--plot", folder, "--force", culprit=folder, says=("is a folder",))


def test_long_plot_name(work: Work) -> None:
    target = work.root / ("p" * 251 + ".png")
    code, _, stderr = run_cli("inspect", work.adapter, "--plot", target)
    assert code == 0, stderr
    assert target.read_bytes().startswith(b"\x89PNG") and hidden(work.root) == []


def test_plot_path_checks_need_no_matplotlib(work: Work) -> None:
    """A refused --plot fails before matplotlib is imported (fast, and the same without it)."""
    notes = work.root / "notes.txt"
    notes.write_text("mine")
    code = (f"import sys; from cli_run import run_cli; c, o, e = run_cli('inspect', {str(work.adapter)!r}, "
            f"'--plot', {str(notes)!r}); assert c == 2, e; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent, timeout=120)


def test_request_error_type_for_refusals(tmp_path: Path) -> None:
    with pytest.raises(RequestError):
        with atomic_output(""):
            pass
