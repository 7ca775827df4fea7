"""Hostile files in the inputs (issue #12): symlinks, special files, loops, copy errors, bad names.

A base folder's non-weight files are copied into the merged folder, so a link in it must
not smuggle anything else in: links are followed only inside the base folder or into a
Hugging Face cache's repo folder (snapshots/<rev>/x -> ../../blobs/<hash>); a link
elsewhere, a link loop, a FIFO or a device is refused with exit status 2 and one line
naming it, before any of it is opened or copied. Copy errors blame the right file: the
input for a read, OUT for a write. A tensor name that is not valid Unicode is refused
when the header is read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from builders import PeftCase
from cli_run import run_cli
from test_hostile import sha256_tree
from lora_tools.errors import FormatError, LoraToolsError
from lora_tools.io.atomic import wrap_write_errors
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.extra_files import copy_extra_files

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX links and FIFOs")

TMP_MARKER = ".lora-tools-"


# --------------------------------------------------------------------------- helpers



def refused(*args: object, culprit: object, says: tuple[str, ...] = (), out: Path | None = None) -> str:
    """Exit status 2, one stderr line naming `culprit`, nothing at OUT or beside it."""
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    assert str(culprit) in lines[0], (str(culprit), lines[0])
    for words in says:
        assert words in lines[0], (words, lines[0])
    if out is not None:
        assert not out.exists() and not out.is_symlink()
        assert [p.name for p in out.parent.iterdir() if TMP_MARKER in p.name] == []
    return lines[0]


def merged(base: Path, adapter: Path, out: Path) -> None:
    code, stdout, stderr = run_cli("merge", base, adapter, "-o", out, "--device", "cpu")
    assert code == 0, stderr


@pytest.fixture
def base(tmp_path: Path, llama_plain_case: PeftCase) -> Path:
    """A private copy of the llama base folder (the fixture is shared read-only)."""
    return Path(shutil.copytree(llama_plain_case.base_dir, tmp_path / "base"))


@contextlib.contextmanager
def fifo_at(path: Path, unblock_after: float = 15.0) -> Iterator[Path]:
    """A FIFO at `path`. Should anything open it for reading, a watchdog unblocks the reader
    (by opening and closing the write end) after `unblock_after` seconds, so a regression
    fails the test instead of hanging it."""
    os.mkfifo(path)
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(unblock_after):
            return
        while not done.is_set():
            with contextlib.suppress(OSError):  # ENXIO: no reader yet
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            done.wait(0.05)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


# --------------------------------------------------------------------------- 6: symlinks in a base folder

@pytest.mark.parametrize("kind", ["file", "etc_passwd", "folder"])
def test_links_out_of_the_base_are_refused(kind: str, base: Path, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    target = tmp_path / "home"
    if kind == "etc_passwd":
        target = Path("/etc/passwd")
        if not target.is_file():
            pytest.skip("needs /etc/passwd")
    elif kind == "file":
        target = tmp_path / "secret.txt"
        target.write_text("root:x:0:0\n")
    else:
        (target / ".ssh").mkdir(parents=True)
        (target / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    link = base / ("original" if kind == "folder" else "tokenizer.json")
    link.symlink_to(target, target_is_directory=kind == "folder")
    out = tmp_path / "merged"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=link, says=(str(target), "outside"), out=out)


def test_links_inside_the_base_are_followed(base: Path, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    (base / "real").mkdir()
    (base / "real" / "params.json").write_text('{"dim": 64}')
    (base / "tokenizer.json").write_text('{"model": {}}')
    (base / "tokenizer_copy.json").symlink_to("tokenizer.json")
    (base / "original").symlink_to("real", target_is_directory=True)
    before = sha256_tree(base)
    out = tmp_path / "merged"
    merged(base, llama_plain_case.adapter_dir, out)
    assert sha256_tree(base) == before
    for name in ("tokenizer_copy.json", "original/params.json", "real/params.json"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "original").is_symlink()


def test_a_linked_folder_does_not_bypass_the_weight_filter(
    base: Path, tmp_path: Path, llama_plain_case: PeftCase
) -> None:
    (base / "real").mkdir()
    (base / "real" / "params.json").write_text("{}")
    shutil.copy(base / "model.safetensors", base / "real" / "consolidated.safetensors")
    (base / "real" / "pytorch_model.bin").write_bytes(b"unmerged weights")
    (base / "original").symlink_to("real", target_is_directory=True)
    out = tmp_path / "merged"
    merged(base, llama_plain_case.adapter_dir, out)
    assert (out / "original" / "params.json").read_text() == "{}"
    assert not (out / "original" / "consolidated.safetensors").exists()
    assert not (out / "original" / "pytorch_model.bin").exists()
    with BaseCheckpoint.open(base) as ckpt:
        assert Path("original/params.json") in ckpt.extra_files()
        assert not any(p.suffix in (".safetensors", ".bin") for p in ckpt.extra_files())


def _hf_cache(src: Path, root: Path) -> Path:
    """`src` laid out as huggingface_hub's cache: every file a link into blobs/; returns the snapshot."""
    repo = root / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("ab" * 20)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = file.relative_to(src)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", digest))
    return snapshot


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_hugging_face_cache_snapshot_still_merges(
    kind: str, tmp_path: Path, llama_plain_case: PeftCase, llama_sharded_base_dir: Path
) -> None:
    src = llama_plain_case.base_dir if kind == "single" else llama_sharded_base_dir
    work = Path(shutil.copytree(src, tmp_path / "src"))
    (work / "original").mkdir()
    (work / "original" / "params.json").write_text("{}")
    snapshot = _hf_cache(work, tmp_path)
    out = tmp_path / "merged"
    merged(snapshot, llama_plain_case.adapter_dir, out)
    plain = tmp_path / "plain"
    merged(work, llama_plain_case.adapter_dir, plain)
    assert sha256_tree(out) == {k.replace(str(plain), str(out)): v for k, v in sha256_tree(plain).items()}
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_shards_linked_from_elsewhere_are_read(tmp_path: Path, llama_sharded_base_dir: Path,
                                               llama_plain_case: PeftCase) -> None:
    """Weights are never copied as extras, only read and validated: a base whose shards
    live on another disk (links to them) merges as before."""
    disk = Path(shutil.copytree(llama_sharded_base_dir, tmp_path / "disk"))
    base = tmp_path / "base"
    base.mkdir()
    for file in disk.iterdir():
        if file.suffix == ".safetensors":
            (base / file.name).symlink_to(file)
        else:
            shutil.copy(file, base / file.name)
    out = tmp_path / "merged"
    merged(base, llama_plain_case.adapter_dir, out)
    plain = tmp_path / "plain"
    merged(disk, llama_plain_case.adapter_dir, plain)
    for file in plain.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name


# --------------------------------------------------------------------------- 7: special files and loops

def test_link_to_dev_zero_is_refused(base: Path, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    (base / "tokenizer.json").symlink_to("/dev/zero")
    out = tmp_path / "merged"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=base / "tokenizer.json",
            says=("/dev/zero",), out=out)


@pytest.mark.parametrize("linked", [False, True], ids=["fifo", "link_to_fifo"])
def test_fifo_in_the_base_folder_is_refused(linked: bool, base: Path, tmp_path: Path,
                                            llama_plain_case: PeftCase) -> None:
    out = tmp_path / "merged"
    with fifo_at(base / ("pipe" if linked else "tokenizer.json")):
        if linked:
            (base / "tokenizer.json").symlink_to("pipe")
        line = refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=base,
                       says=("not a regular file",), out=out)
    assert f"{base / 'pipe'}:" in line or f"{base / 'tokenizer.json'}:" in line


def _refused_before_copying(base: Path, link: Path) -> None:
    """The loop is found while listing the files to copy, not ~40 copies deep."""
    with BaseCheckpoint.open(base) as ckpt, pytest.raises(FormatError) as caught:
        ckpt.extra_files()
    assert str(link) in str(caught.value) and "loop" in str(caught.value)


@pytest.mark.parametrize("target", [".", "..", "sub"], ids=["self", "parent_in_cache", "ancestor"])
def test_link_loops_are_refused(target: str, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    # Inside a cache snapshot "../.." is the repo folder, which links may point into.
    snapshot = _hf_cache(Path(shutil.copytree(llama_plain_case.base_dir, tmp_path / "src")), tmp_path)
    (snapshot / "sub" / "deeper").mkdir(parents=True)
    link = snapshot / "sub" / "deeper" / "loop"
    link.symlink_to({".": ".", "..": "../../../..", "sub": "../../sub"}[target], target_is_directory=True)
    out = tmp_path / "merged"
    refused("merge", snapshot, llama_plain_case.adapter_dir, "-o", out, culprit=link, says=("loop",), out=out)
    _refused_before_copying(snapshot, link)


def test_links_into_each_other_are_a_loop(base: Path, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    (base / "a").mkdir()
    (base / "b").mkdir()
    (base / "a" / "to_b").symlink_to("../b", target_is_directory=True)
    (base / "b" / "to_a").symlink_to("../a", target_is_directory=True)
    out = tmp_path / "merged"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=base, says=("loop",), out=out)
    _refused_before_copying(base, base / "a" / "to_b")


def test_a_link_to_itself_is_refused(base: Path, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    (base / "tokenizer.json").symlink_to("tokenizer.json")
    out = tmp_path / "merged"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=base / "tokenizer.json", out=out)
    _refused_before_copying(base, base / "tokenizer.json")


def test_fifo_as_base_file_is_refused(tmp_path: Path, llama_plain_case: PeftCase) -> None:
    out = tmp_path / "merged.safetensors"
    with fifo_at(tmp_path / "base.safetensors") as fifo:
        refused("merge", fifo, llama_plain_case.adapter_dir, "-o", out, culprit=fifo,
                says=("not a regular file",), out=out)
        refused("inspect", llama_plain_case.adapter_dir, "--base", fifo, culprit=fifo, says=("not a regular file",))


def test_fifo_as_model_safetensors_in_a_folder_is_refused(tmp_path: Path, llama_plain_case: PeftCase) -> None:
    (tmp_path / "base").mkdir()
    shutil.copy(llama_plain_case.base_dir / "config.json", tmp_path / "base")
    out = tmp_path / "merged"
    with fifo_at(tmp_path / "base" / "model.safetensors") as fifo:
        refused("merge", tmp_path / "base", llama_plain_case.adapter_dir, "-o", out, culprit=fifo,
                says=("not a regular file",), out=out)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_fifo_as_adapter_file_is_refused(suffix: str, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    out = tmp_path / "merged"
    with fifo_at(tmp_path / f"adapter{suffix}") as fifo:
        refused("inspect", fifo, culprit=fifo, says=("not a regular file",))
        refused("merge", llama_plain_case.base_dir, fifo, "-o", out, culprit=fifo,
                says=("not a regular file",), out=out)


def test_device_as_adapter_file_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "adapter.safetensors"
    link.symlink_to("/dev/zero")
    refused("inspect", link, culprit=link, says=("not a regular file",))


# --------------------------------------------------------------------------- 13: copy errors blame the right file

def _failing(call: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = getattr(os, call)

    def fail(fd: int, *args: object) -> object:
        if fd > 2:
            raise OSError(errno.EIO if call == "read" else errno.ENOSPC, "")
        return real(fd, *args)

    monkeypatch.setattr(os, call, fail)


@pytest.mark.parametrize("call", ["read", "write"])
def test_copy_errors_name_the_input_for_a_read_and_out_for_a_write(
    call: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    _failing(call, monkeypatch)
    with pytest.raises(LoraToolsError) as caught, wrap_write_errors(out):
        copy_extra_files(tmp_path / "src", ["tokenizer.json"], out)
    monkeypatch.undo()
    culprit, problem = (tmp_path / "src" / "tokenizer.json", "read") if call == "read" else (out, "write")
    assert str(caught.value).startswith(f"{culprit}: cannot {problem}: ")
    assert isinstance(caught.value, FormatError) == (call == "read")


def test_file_too_large_while_copying_names_out_in_a_real_process(
    base: Path, tmp_path: Path, llama_plain_case: PeftCase
) -> None:
    """RLIMIT_FSIZE makes the kernel refuse the write of a big tokenizer.json (EFBIG)."""
    resource = pytest.importorskip("resource")
    (base / "tokenizer.json").write_bytes(b"x" * (8 << 20))
    limit = 4 << 20
    assert all(p.stat().st_size < limit for p in base.iterdir() if p.name != "tokenizer.json")
    out = tmp_path / "merged"

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    command = [sys.executable, "-m", "lora_tools", "merge", str(base), str(llama_plain_case.adapter_dir),
               "-o", str(out), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=preexec, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"Error: {out}: cannot write: ") and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- 10: names that are not valid Unicode

def _with_extra_tensor(src: Path, dst: Path, name_json: str) -> None:
    """`src` with one more F32 tensor whose name is `name_json`, written raw into the JSON."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    header.pop("__metadata__", None)
    text = json.dumps(header, separators=(",", ":"))
    extra = f'"{name_json}":{{"dtype":"F32","shape":[1],"data_offsets":[{len(body)},{len(body) + 4}]}}'
    raw = (text[:-1] + "," + extra + "}").encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + body + b"\0" * 4)


def test_lone_surrogate_in_a_base_is_refused(tmp_path: Path, llama_plain_case: PeftCase) -> None:
    base = Path(shutil.copytree(llama_plain_case.base_dir, tmp_path / "base"))
    _with_extra_tensor(llama_plain_case.base_dir / "model.safetensors", base / "model.safetensors", "x\\udc80.weight")
    out = tmp_path / "merged"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, culprit=base / "model.safetensors",
            says=("not valid Unicode",), out=out)
    refused("inspect", llama_plain_case.adapter_dir, "--base", base, culprit=base / "model.safetensors",
            says=("not valid Unicode",))


@pytest.mark.parametrize("where", ["name", "metadata"])
def test_lone_surrogate_in_an_adapter_is_refused(where: str, tmp_path: Path, llama_plain_case: PeftCase) -> None:
    adapter = tmp_path / "adapter.safetensors"
    if where == "name":
        _with_extra_tensor(llama_plain_case.adapter_file, adapter, "x\\ud800")
    else:
        data = llama_plain_case.adapter_file.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header["__metadata__"] = {"note": "\ud800"}  # json.dumps writes the escape "\ud800"
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        adapter.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    refused("inspect", adapter, culprit=adapter, says=("not valid Unicode",))
