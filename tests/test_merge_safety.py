"""merge never damages anything (issue #4): OUT appears complete or not at all, --force
replaces only after success, interrupts (SIGKILL, SIGINT, SIGTERM) leave no OUT, bad
input is one line on stderr with exit status 2, and inputs are never written to.

The interrupt tests run the real `python -m lora_tools merge` in a subprocess on a
synthetic ~335 MB fp32 base (20 adapted 2048×2048 tensors), big enough that the merge
is still streaming when the signal arrives. No hook slows the merge down.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from builders import KohyaCase, PeftCase
from cli_run import run_cli

TMP_MARKER = ".lora-tools-tmp-"




def error_line(stderr: str) -> str:
    """The one line a failure prints (blank lines aside: see test_error_is_exactly_one_line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


def sha256_tree(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files and folders."""
    digests = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digest = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[str(file)] = digest.hexdigest()
    return digests


@pytest.fixture
def untouched() -> Iterator[Callable[..., None]]:
    """watch(path, ...): those files must hash the same when the test ends."""
    watched: list[tuple[tuple[Path, ...], dict[str, str]]] = []

    def watch(*paths: Path) -> None:
        watched.append((paths, sha256_tree(*paths)))

    yield watch
    for paths, before in watched:
        assert sha256_tree(*paths) == before, f"an input changed: {paths}"


def no_leftovers(folder: Path, out_name: str) -> None:
    """Nothing named after OUT in `folder`: no OUT, no temporary, no renamed-aside old copy."""
    assert [p.name for p in folder.iterdir() if out_name in p.name] == []


# --------------------------------------------------------------------------- OUT and --force

def test_existing_out_without_force_is_refused_and_untouched(llama_plain_case: PeftCase, tmp_path: Path,
                                                             untouched: Callable[..., None]) -> None:
    untouched(llama_plain_case.base_dir, llama_plain_case.adapter_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    untouched(out)
    code, stdout, stderr = run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out)
    assert code == 2 and stdout == ""
    line = error_line(stderr)
    assert str(out) in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_force_replaces_only_after_success(llama_plain_case: PeftCase, peft_case_factory: Callable[[str], PeftCase],
                                           tmp_path: Path, untouched: Callable[..., None]) -> None:
    base, adapter = llama_plain_case.base_dir, llama_plain_case.adapter_dir
    untouched(base, adapter)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier merge: what --force may replace (issue #12)
    (out / "keep.txt").write_text("old output")

    # 1. The adapter does not fit: refused before anything is written.
    gpt2 = peft_case_factory("gpt2_conv1d").adapter_dir
    code, _, stderr = run_cli("merge", base, gpt2, "-o", out, "--force")
    assert code == 2 and "matches no module" in error_line(stderr)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]

    # 2. A failure halfway through the stream (an update that overflows float32 in the
    # 9th adapted tensor): the temporary is dropped, the old OUT stays.
    overflow = tmp_path / "overflow.safetensors"
    g = torch.Generator().manual_seed(0)
    factors = {}
    for layer in range(2):
        for proj, (rows, cols) in {"q_proj": (64, 64), "v_proj": (32, 64)}.items():
            module = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            big = 1e30 if (layer, proj) == (1, "v_proj") else 1.0
            factors[f"{module}.lora_A.weight"] = torch.randn(4, cols, generator=g) * big
            factors[f"{module}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * big
    save_file(factors, overflow)
    code, _, stderr = run_cli("merge", base, overflow, "-o", out, "--force")
    assert code == 2
    line = error_line(stderr)
    assert "model.layers.1.self_attn.v_proj.weight" in line and "NaN or Inf" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "overflow.safetensors"]

    # 3. Success: replaced, nothing of the old folder left, nothing left beside it.
    code, _, stderr = run_cli("merge", base, adapter, "-o", out, "--force", "--quiet")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "overflow.safetensors"]


def test_out_inside_an_input_is_refused(llama_plain_case: PeftCase, tmp_path: Path,
                                        untouched: Callable[..., None]) -> None:
    import shutil

    base = shutil.copytree(llama_plain_case.base_dir, tmp_path / "base")  # never risk the shared fixture
    adapter = shutil.copytree(llama_plain_case.adapter_dir, tmp_path / "adapter")
    untouched(base, adapter)
    for out in (base / "merged", adapter / "merged", base / "model.safetensors"):
        before = sorted(p.name for p in out.parent.iterdir())
        code, _, stderr = run_cli("merge", base, adapter, "-o", out, "--force")
        assert code == 2, out
        assert "overlaps the input" in error_line(stderr)
        assert sorted(p.name for p in out.parent.iterdir()) == before
    # OUT containing an input is refused too (--force would delete the input).
    code, _, stderr = run_cli("merge", base, adapter, "-o", tmp_path, "--force")
    assert code == 2 and "overlaps the input" in error_line(stderr)


# --------------------------------------------------------------------------- bad input

def test_weight_count_mismatch(llama_plain_case: PeftCase, tmp_path: Path, untouched: Callable[..., None]) -> None:
    untouched(llama_plain_case.base_dir, llama_plain_case.adapter_dir)
    out = tmp_path / "merged"
    for command in (["merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out],
                    ["verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir, llama_plain_case.base_dir]):
        code, stdout, stderr = run_cli(*command, "--weight", 0.5, "--weight", 0.5)
        assert code == 2 and stdout == ""
        assert "got 2 --weight value(s) for 1 adapter(s)" in error_line(stderr)
    no_leftovers(tmp_path, "merged")


def test_nan_in_adapter(llama_plain_case: PeftCase, malformed_files: dict[str, Path], tmp_path: Path,
                        untouched: Callable[..., None]) -> None:
    nan_file = malformed_files["nan_in_lora_a"]
    untouched(llama_plain_case.base_dir, nan_file.parent)
    out = tmp_path / "merged"
    for adapter in (nan_file.parent, nan_file):
        code, _, stderr = run_cli("merge", llama_plain_case.base_dir, adapter, "-o", out)
        assert code == 2
        line = error_line(stderr)
        assert str(nan_file) in line and "NaN" in line
    no_leftovers(tmp_path, "merged")


def test_adapter_that_does_not_fit(llama_plain_case: PeftCase, peft_case_factory: Callable[[str], PeftCase],
                                   kohya_case: KohyaCase, tmp_path: Path, untouched: Callable[..., None]) -> None:
    base = llama_plain_case.base_dir
    gpt2 = peft_case_factory("gpt2_conv1d")
    untouched(base, gpt2.adapter_dir, kohya_case.lora_file)
    out = tmp_path / "merged"

    # A module the base lacks: the adapter and its first layer are named.
    code, _, stderr = run_cli("merge", base, gpt2.adapter_dir, "-o", out)
    line = error_line(stderr)
    assert code == 2 and str(gpt2.adapter_dir) in line and "'transformer.h.0.attn.c_attn'" in line
    code, _, stderr = run_cli("merge", base, kohya_case.lora_file, "-o", out)
    assert code == 2 and str(kohya_case.lora_file) in error_line(stderr)

    # The right module, the wrong shape (in_features 48 against a 64×64 q_proj).
    wrong = tmp_path / "wrong_shape.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 48, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=g)}, wrong)
    untouched(wrong)
    code, _, stderr = run_cli("merge", base, wrong, "-o", out)
    line = error_line(stderr)
    assert code == 2 and str(wrong) in line
    assert "model.layers.0.self_attn.q_proj" in line and "(64, 48)" in line and "(64, 64)" in line

    # Second of two adapters misfits: it is the one named.
    code, _, stderr = run_cli("merge", base, llama_plain_case.adapter_dir, wrong, "-o", out)
    line = error_line(stderr)
    assert code == 2 and str(wrong) in line and str(llama_plain_case.adapter_dir) not in line

    # verify refuses the same inputs the same way.
    code, _, stderr = run_cli("verify", base, wrong, base)
    assert code == 2 and str(wrong) in error_line(stderr)
    no_leftovers(tmp_path, "merged")


def test_verify_never_writes_to_its_inputs(llama_plain_case: PeftCase, tmp_path: Path,
                                           untouched: Callable[..., None]) -> None:
    base, adapter = llama_plain_case.base_dir, llama_plain_case.adapter_dir
    merged = tmp_path / "merged"
    code, _, stderr = run_cli("merge", base, adapter, "-o", merged, "--quiet")
    assert code == 0, stderr
    untouched(base, adapter, merged)
    assert run_cli("verify", base, adapter, merged)[0] == 0
    assert run_cli("verify", base, adapter, base)[0] == 1  # the base is not the merge
    assert run_cli("verify", base, adapter, tmp_path / "missing")[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_error_is_exactly_one_line(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    code, stdout, stderr = run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir,
                                   "-o", tmp_path / "m", "--weight", 1, "--weight", 2)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("Error: ")


# --------------------------------------------------------------------------- interrupts

@dataclass(frozen=True)
class BigInputs:
    base: Path
    adapter: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigInputs]:
    """A ~335 MB fp32 single-file base and a rank-2 PEFT-named adapter for all 20 layers."""
    root = tmp_path_factory.mktemp("big")
    n_layers, dim = 20, 2048
    g = torch.Generator().manual_seed(0)
    row = torch.randn(dim, generator=g) * 0.02
    base = {f"layers.{i}.proj.weight": row.roll(i).expand(dim, dim).contiguous() for i in range(n_layers)}
    base["norm.weight"] = torch.ones(dim)
    save_file(base, root / "base.safetensors", metadata={"format": "pt"})
    del base
    adapter = {}
    for i in range(n_layers):
        adapter[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(2, dim, generator=g)
        adapter[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(dim, 2, generator=g) * 1e-3
    save_file(adapter, root / "adapter.safetensors")
    inputs = BigInputs(root / "base.safetensors", root / "adapter.safetensors", {})
    digests = sha256_tree(inputs.base, inputs.adapter)
    yield BigInputs(inputs.base, inputs.adapter, digests)
    assert sha256_tree(inputs.base, inputs.adapter) == digests, "a merge wrote to its inputs"


@dataclass(frozen=True)
class Interrupted:
    signal: int
    returncode: int
    stderr: str
    folder: Path
    out: Path
    tmp_bytes_at_signal: int


def _interrupt(big: BigInputs, folder: Path, sig: int) -> Interrupted:
    """Start a real merge, wait until it streams into its temporary, send `sig`."""
    out = folder / "merged.safetensors"
    command = [sys.executable, "-m", "lora_tools", "merge", str(big.base), str(big.adapter), "-o", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=folder)
    try:
        deadline = time.monotonic() + 60
        temporary: list[Path] = []
        while not temporary:  # the temp sibling appears once the header is written
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the merge never started writing"
            time.sleep(0.01)
            temporary = [p for p in folder.iterdir() if TMP_MARKER in p.name]
        started = time.monotonic()
        while time.monotonic() - started < 0.3 and temporary[0].stat().st_size < 32 << 20:
            time.sleep(0.005)  # well into the stream, at most 0.3 s
        size = temporary[0].stat().st_size
        assert process.poll() is None, "the merge finished before the signal: the base is too small to test this"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return Interrupted(sig, process.returncode, stderr.decode(), folder, out, size)


@pytest.fixture(scope="module", params=[signal.SIGKILL, signal.SIGINT, signal.SIGTERM],
                ids=["SIGKILL", "SIGINT", "SIGTERM"])
def interrupted(request: pytest.FixtureRequest, big_inputs: BigInputs,
                tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    name = signal.Signals(request.param).name
    return _interrupt(big_inputs, tmp_path_factory.mktemp(name), request.param)


def test_interrupted_merge_leaves_no_out(interrupted: Interrupted, big_inputs: BigInputs) -> None:
    assert interrupted.tmp_bytes_at_signal < big_inputs.base.stat().st_size  # it was mid-stream
    assert interrupted.returncode != 0
    assert not interrupted.out.exists()
    left = [p.name for p in interrupted.folder.iterdir()]
    if interrupted.signal == signal.SIGKILL:
        # Nothing can clean up after SIGKILL: a hidden temporary may stay, never OUT.
        assert interrupted.returncode == -signal.SIGKILL
        assert all(name.startswith(".merged.safetensors" + TMP_MARKER) for name in left), left
    else:
        assert left == [], f"{signal.Signals(interrupted.signal).name} left {left}"
    assert sha256_tree(big_inputs.base, big_inputs.adapter) == big_inputs.digests


def test_interrupted_merge_says_so_in_one_line(interrupted: Interrupted) -> None:
    if interrupted.signal == signal.SIGKILL:
        pytest.skip("SIGKILL cannot be reported")
    assert interrupted.returncode == 128 + interrupted.signal  # 130 / 143, as a shell reports them
    assert interrupted.stderr.count("\n") == 1 and interrupted.stderr.startswith("Error: "), interrupted.stderr


def test_merge_subprocess_completes_and_verifies(llama_plain_case: PeftCase, tmp_path: Path,
                                                 untouched: Callable[..., None]) -> None:
    """The installed entry point, end to end: merge --verify, exit 0, the report on stdout."""
    untouched(llama_plain_case.base_dir, llama_plain_case.adapter_dir)
    entry = Path(sys.executable).with_name("lora-tools")
    out = tmp_path / "merged"
    done = subprocess.run([str(entry), "merge", str(llama_plain_case.base_dir), str(llama_plain_case.adapter_dir),
                           "-o", str(out), "--verify"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "EQUIVALENT" in done.stdout and "NOT EQUIVALENT" not in done.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
