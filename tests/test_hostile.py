"""Hostile input (issue #6): merge, verify, blend and inspect --base against files from strangers.

Each broken input is refused with exit status 2 and exactly one stderr line naming the
file at fault and the problem: no traceback, no OUT and no temporary beside it, and every
input (and an OUT that already existed) hashes the same before and after. The inputs:
safetensors corruptions applied to real files in every role (ADAPTER, BASE as a folder, a
file and a shard, MERGED), broken shard indexes, code-running pickles (a marker file proves
the code never ran), bad adapter_config.json, bad factors, NaN in a base, and dangerous
paths (missing, a folder for a file, unreadable, OUT overlapping an input).

inspect of a broken ADAPTER alone is covered by test_malformed.py; merge's interrupts by
test_merge_safety.py; write failures by test_write_failures.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from builders import PeftCase
from cli_run import run_cli
from lora_tools.cli import cli
from lora_tools.merge import merge

TMP_MARKER = ".lora-tools-"
Q_PROJ = "model.layers.0.self_attn.q_proj"
PEFT_Q = f"base_model.model.{Q_PROJ}"


# --------------------------------------------------------------------------- running a command

def sha256_tree(*paths: Path) -> dict[str, str]:
    """sha256 of every file under the given files and folders (symlinks as what they point to)."""
    digests = {}
    for path in paths:
        files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def run(*args: object) -> Outcome:
    """Run the CLI in-process. Every path argument that exists must hash the same after,
    OUT (the argument after -o) included unless the command succeeded."""
    watched = [a for a in args if isinstance(a, Path) and (a.exists() or a.is_symlink())]
    before = sha256_tree(*watched)
    code, stdout, stderr = run_cli(*args)
    after = sha256_tree(*watched)
    if code == 0 and "-o" in args:
        out = str(args[list(args).index("-o") + 1])
        before, after = ({k: v for k, v in d.items() if not k.startswith(out)} for d in (before, after))
    assert after == before, f"an input changed: {args}"
    return Outcome(code, stdout, stderr)


def nothing_written(out: Path) -> None:
    """No OUT (unless it existed: then `run` proved it unchanged) and no temporary beside it."""
    siblings = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_MARKER}")]
    assert siblings == [], siblings


def refused(*args: object, culprit: Path, says: tuple[str, ...] = (), out: Path | None = None) -> str:
    """The command fails with status 2 and one stderr line naming `culprit`; returns the line."""
    existed = out is not None and out.exists()
    outcome = run(*args)
    assert outcome.code == 2, outcome
    assert outcome.stdout == "" and "Traceback" not in outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.stderr
    assert str(culprit) in lines[0], (str(culprit), lines[0])
    for words in says:
        assert words in lines[0], (words, lines[0])
    if out is not None:
        assert out.exists() == existed
        nothing_written(out)
    return lines[0]


# --------------------------------------------------------------------------- corrupting real files

def _split(data: bytes) -> tuple[dict, bytes, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 : 8 + n], data[8 + n :]


def _join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# kind -> words the error line must contain
CORRUPTIONS: dict[str, str] = {
    "truncated": "truncated",
    "header_len_past_eof": "header length",
    "header_len_absurd": "header length",  # 2**63: refused before any allocation
    "header_not_json": "JSON",
    "header_not_utf8": "UTF-8",
    "empty": "too short",
    "too_short": "too short",
    "duplicate_keys": "duplicate",
    "overlapping_offsets": "overlap",
    "offsets_out_of_range": "past the end",
    "offsets_reversed": "data_offsets",
    "shape_size_mismatch": "needs",
    "unknown_dtype": "unknown dtype",
}


def corrupt(data: bytes, kind: str) -> bytes:
    """A valid safetensors file's bytes, broken in one way (names in CORRUPTIONS)."""
    header, raw, body = _split(data)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second, last = header[names[0]], header[names[1]], header[names[-1]]
    if kind == "truncated":
        return data[: len(data) - max(1, len(body) // 3)]
    if kind == "header_len_past_eof":
        return struct.pack("<Q", len(data)) + data[8:]
    if kind == "header_len_absurd":
        return struct.pack("<Q", 2**63) + data[8:]
    if kind == "header_not_json":
        return data[:8] + b"{" + b"!" * (len(raw) - 1) + body
    if kind == "header_not_utf8":
        at = raw.index(f'"{names[0]}"'.encode()) + 1
        return data[:8] + raw[:at] + b"\xff" + raw[at + 1 :] + body
    if kind == "empty":
        return b""
    if kind == "too_short":
        return data[:5]
    if kind == "duplicate_keys":  # the same entry twice: json.loads alone would not notice
        entry = json.dumps({names[0]: first}, separators=(",", ":")).encode()[1:-1]
        return _join(b"{" + entry + b"," + raw.strip()[1:], body)
    if kind == "overlapping_offsets":
        size = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    elif kind == "offsets_out_of_range":
        last["data_offsets"] = [o + len(body) for o in last["data_offsets"]]
    elif kind == "offsets_reversed":
        first["data_offsets"] = first["data_offsets"][::-1]
    elif kind == "shape_size_mismatch":
        first["shape"][0] += 1
    elif kind == "unknown_dtype":
        first["dtype"] = "F33"
    else:
        raise ValueError(kind)
    return _join(header, body)


def test_corruptions_are_refused_by_the_official_reader_too(llama_plain_case: PeftCase) -> None:
    """Self-check: each corruption of a real file is a change the official reader refuses too."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = llama_plain_case.adapter_file.read_bytes()
    header, _, body = _split(data)
    assert load(_join(header, body)).keys() == load(data).keys()  # re-serializing alone breaks nothing
    for kind in CORRUPTIONS:
        broken = corrupt(data, kind)
        assert broken != data
        if kind == "duplicate_keys":  # serde_json keeps the last of two identical entries
            continue
        with pytest.raises(SafetensorError):
            load(broken)


# --------------------------------------------------------------------------- fixtures

@dataclass(frozen=True)
class World:
    """Valid inputs to break, built once per module (copies, never the shared fixtures)."""

    root: Path
    base: Path  # llama folder
    base_file: Path  # the same model as one file
    sharded: Path  # llama in 4 shards + index
    adapter: Path  # PEFT folder (llama_plain)
    other: Path  # a second adapter for blend (llama_rslora)
    merged: Path  # merge of adapter into base
    merged_sharded: Path  # merge of adapter into sharded

    def out(self, name: str = "out") -> Path:
        folder = self.root / "outs"
        folder.mkdir(exist_ok=True)
        return folder / name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_plain_case: PeftCase,
          peft_case_factory: Callable[[str], PeftCase], llama_sharded_base_dir: Path) -> World:
    root = tmp_path_factory.mktemp("hostile")
    base = shutil.copytree(llama_plain_case.base_dir, root / "base")
    base_file = root / "base.safetensors"
    shutil.copy(base / "model.safetensors", base_file)
    sharded = shutil.copytree(llama_sharded_base_dir, root / "sharded")
    adapter = shutil.copytree(llama_plain_case.adapter_dir, root / "adapter")
    other = shutil.copytree(peft_case_factory("llama_rslora").adapter_dir, root / "other")
    merge(base, [adapter], root / "merged", device="cpu")
    merge(sharded, [adapter], root / "merged_sharded", device="cpu")
    return World(root, base, base_file, sharded, adapter, other, root / "merged", root / "merged_sharded")


def _broken_copy(source: Path, dest: Path, relative: str | None, data: bytes) -> Path:
    """A copy of `source` (folder or file) with `relative` (or the file itself) replaced by `data`."""
    if source.is_dir():
        shutil.copytree(source, dest)
        target = dest / relative
    else:
        dest.mkdir()
        target = dest / source.name
    target.write_bytes(data)
    return target


@pytest.fixture(scope="module")
def broken(world: World) -> Callable[[str, str, str], tuple[Path, Path]]:
    """broken(role, form, kind) -> (path to pass, corrupt file): built once per combination."""
    cache: dict[tuple[str, str, str], tuple[Path, Path]] = {}
    index = json.loads((world.sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    sources = {
        ("adapter", "folder"): (world.adapter, "adapter_model.safetensors"),
        ("adapter", "file"): (world.adapter / "adapter_model.safetensors", None),
        ("base", "folder"): (world.base, "model.safetensors"),
        ("base", "file"): (world.base_file, None),
        ("base", "shard"): (world.sharded, shard),
        ("merged", "folder"): (world.merged, "model.safetensors"),
        ("merged", "file"): (world.merged / "model.safetensors", None),
        ("merged", "shard"): (world.merged_sharded, shard),
    }

    def get(role: str, form: str, kind: str) -> tuple[Path, Path]:
        key = (role, form, kind)
        if key not in cache:
            source, relative = sources[(role, form)]
            original = (source / relative if relative else source).read_bytes()
            dest = world.root / "broken" / f"{role}-{form}-{kind}"
            dest.parent.mkdir(exist_ok=True)
            target = _broken_copy(source, dest, relative, corrupt(original, kind))
            # a lone file is passed as the file; a folder (or sharded model) as the folder
            cache[key] = (target if relative is None else dest, target)
        return cache[key]

    return get


# --------------------------------------------------------------------------- corrupt safetensors, every role

ADAPTER_COMMANDS = ("merge", "verify", "blend_first", "blend_second")


def _adapter_command(world: World, command: str, adapter: Path) -> tuple[list[object], Path | None]:
    out = world.out()
    if command == "merge":
        return ["merge", world.base, adapter, "-o", out], out
    if command == "verify":
        return ["verify", world.base, adapter, world.merged], None
    pair = [adapter, world.other] if command == "blend_first" else [world.other, adapter]
    return ["blend", *pair, "--weight", 0.5, "-o", out], out


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("form", ["folder", "file"])
@pytest.mark.parametrize("command", ADAPTER_COMMANDS)
def test_corrupt_adapter(world: World, broken, command: str, form: str, kind: str) -> None:
    path, culprit = broken("adapter", form, kind)
    args, out = _adapter_command(world, command, path)
    refused(*args, culprit=culprit, says=(CORRUPTIONS[kind],), out=out)


def _base_command(world: World, command: str, base: Path) -> tuple[list[object], Path | None]:
    out = world.out()
    if command == "merge":
        return ["merge", base, world.adapter, "-o", out], out
    if command == "verify":
        return ["verify", base, world.adapter, world.merged], None
    return ["inspect", world.adapter, "--base", base, "--json"], None


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("form", ["folder", "file", "shard"])
@pytest.mark.parametrize("command", ["merge", "verify", "inspect"])
def test_corrupt_base(world: World, broken, command: str, form: str, kind: str) -> None:
    path, culprit = broken("base", form, kind)
    args, out = _base_command(world, command, path)
    refused(*args, culprit=culprit, says=(CORRUPTIONS[kind],), out=out)


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("form", ["folder", "file", "shard"])
def test_corrupt_merged(world: World, broken, form: str, kind: str) -> None:
    path, culprit = broken("merged", form, kind)
    base = world.sharded if form == "shard" else world.base
    refused("verify", base, world.adapter, path, "--json", culprit=culprit, says=(CORRUPTIONS[kind],))


# --------------------------------------------------------------------------- broken shard indexes

INDEX = "model.safetensors.index.json"


def _break_index(folder: Path, kind: str) -> Path:
    """Break the sharded model in `folder` one way; return the file the error must name."""
    index_path = folder / INDEX
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    tensor = next(iter(weight_map))
    text = None
    if kind == "not_json":
        text = '{"weight_map": {'
    elif kind == "not_utf8":
        index_path.write_bytes(b'{"weight_map": {"\xff": 1}}')
        return index_path
    elif kind == "deeply_nested":
        text = "[" * 100_000
    elif kind == "huge_int":
        text = '{"metadata": {"total_size": ' + "9" * 5000 + "}}"
    elif kind == "not_an_object":
        text = "[]"
    elif kind == "no_weight_map":
        text = json.dumps({"metadata": {}})
    elif kind == "path_traversal":
        weight_map[tensor] = "../base/model.safetensors"
    elif kind == "absolute_path":
        weight_map[tensor] = "/etc/passwd"
    elif kind == "shard_missing":
        weight_map[tensor] = "model-00009-of-00009.safetensors"
        index_path.write_text(json.dumps(index))
        return folder  # the missing shard, or the one that holds the tensor it was said to

    elif kind == "shard_deleted":
        (folder / shards[-1]).unlink()
        return folder / shards[-1]
    elif kind == "shard_is_a_folder":
        (folder / shards[-1]).unlink()
        (folder / shards[-1]).mkdir()
        return folder / shards[-1]
    elif kind == "wrong_shard":  # the tensor is in another shard than the index says
        weight_map[tensor] = next(s for s in shards if s != weight_map[tensor])
    elif kind == "unlisted_tensor":
        shard = weight_map.pop(tensor)
        index_path.write_text(json.dumps(index))
        return folder / shard
    elif kind == "phantom_tensor":
        weight_map["model.layers.9.mlp.up_proj.weight"] = shards[0]
        index_path.write_text(json.dumps(index))
        return folder / shards[0]
    else:
        raise ValueError(kind)
    index_path.write_text(text if text is not None else json.dumps(index))
    if kind == "wrong_shard":
        return folder  # either shard may be named: the one that holds it, or the one said to
    return index_path


INDEX_BREAKS = ("not_json", "not_utf8", "deeply_nested", "huge_int", "not_an_object", "no_weight_map",
                "path_traversal", "absolute_path", "shard_missing", "shard_deleted", "shard_is_a_folder",
                "wrong_shard", "unlisted_tensor", "phantom_tensor")


@pytest.fixture(scope="module")
def broken_index(world: World) -> Callable[[str, str], tuple[Path, Path]]:
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(role: str, kind: str) -> tuple[Path, Path]:
        if (role, kind) not in cache:
            folder = world.root / "broken-index" / f"{role}-{kind}"
            shutil.copytree(world.sharded if role == "base" else world.merged_sharded, folder)
            cache[(role, kind)] = (folder, _break_index(folder, kind))
        return cache[(role, kind)]

    return get


@pytest.mark.parametrize("kind", INDEX_BREAKS)
@pytest.mark.parametrize("command", ["merge", "verify", "inspect"])
def test_broken_index_of_base(world: World, broken_index, command: str, kind: str) -> None:
    folder, culprit = broken_index("base", kind)
    args, out = _base_command(world, command, folder)
    refused(*args, culprit=culprit, out=out)


@pytest.mark.parametrize("kind", INDEX_BREAKS)
def test_broken_index_of_merged(world: World, broken_index, kind: str) -> None:
    folder, culprit = broken_index("merged", kind)
    refused("verify", world.sharded, world.adapter, folder, culprit=culprit)


# --------------------------------------------------------------------------- pickles

class _Call:
    """Unpickling this calls func(*args): what a malicious checkpoint does."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


PICKLES = ("zip_os_system", "legacy_os_system", "raw_pickle_exec", "zip_exec_in_tensor_slot", "pt_file", "ckpt_file")


def _write_pickle(kind: str, folder: Path, marker: Path) -> Path:
    """A .bin/.pt/.ckpt adapter whose loading (with weights_only=False) creates `marker`."""
    touch = _Call(os.system, f"touch '{marker}'")
    make = _Call(exec, f"open({str(marker)!r}, 'w').close()")
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    path = folder / {"pt_file": "adapter.pt", "ckpt_file": "adapter.ckpt"}.get(kind, "adapter_model.bin")
    state = {f"{PEFT_Q}.lora_A.weight": torch.zeros(4, 64), f"{PEFT_Q}.lora_B.weight": touch}
    if kind in ("zip_os_system", "pt_file"):
        torch.save(state, path)
    elif kind in ("legacy_os_system", "ckpt_file"):
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle_exec":
        path.write_bytes(pickle.dumps(make, protocol=2))
    elif kind == "zip_exec_in_tensor_slot":
        torch.save({f"{PEFT_Q}.lora_A.weight": make, f"{PEFT_Q}.lora_B.weight": torch.zeros(64, 4)}, path)
    return path


@pytest.fixture(scope="module")
def pickles(world: World) -> dict[str, tuple[Path, Path, Path]]:
    """kind -> (path to pass, the pickle file, its marker)."""
    made = {}
    for kind in PICKLES:
        marker = world.root / "markers" / kind
        marker.parent.mkdir(exist_ok=True)
        path = _write_pickle(kind, world.root / "pickles" / kind, marker)
        made[kind] = (path if kind in ("pt_file", "ckpt_file") else path.parent, path, marker)
    return made


def test_pickles_would_run_code(tmp_path: Path, pickles) -> None:
    """Control: each payload, built the same way, runs code when unpickled unsafely."""
    for kind, (_, _, marker) in pickles.items():
        control = tmp_path / f"{kind}.ran"
        path = _write_pickle(kind, tmp_path / kind, control)
        with warnings.catch_warnings(), contextlib.suppress(Exception):  # a raw pickle is no torch file
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=False)  # our own payload: it only creates `control`
        assert control.exists(), kind
        assert not marker.exists(), kind


@pytest.mark.parametrize("kind", PICKLES)
@pytest.mark.parametrize("command", ["merge", "verify", "blend", "inspect"])
def test_malicious_pickle_is_refused_and_never_runs(world: World, pickles, command: str, kind: str) -> None:
    path, culprit, marker = pickles[kind]
    out = world.out()
    args = {
        "merge": ["merge", world.base, path, "-o", out],
        "verify": ["verify", world.base, path, world.merged],
        "blend": ["blend", path, world.other, "--weight", 0.5, "-o", out],
        "inspect": ["inspect", path, "--base", world.base],
    }[command]
    refused(*args, culprit=culprit, says=("pickle",), out=out if command in ("merge", "blend") else None)
    assert not marker.exists()


def test_corpus_pickle_for_every_command(world: World, malformed_files: dict[str, Path], pickle_marker: Path) -> None:
    folder = malformed_files["pickle_bin"]
    culprit = folder / "adapter_model.bin"
    out = world.out()
    refused("merge", world.base, folder, "-o", out, culprit=culprit, out=out)
    refused("verify", world.base, folder, world.merged, culprit=culprit)
    refused("blend", world.other, folder, "--weight", 0.5, "-o", out, culprit=culprit, out=out)
    assert not pickle_marker.exists()


@pytest.fixture(scope="module")
def bin_adapter(world: World) -> Path:
    """The PEFT adapter as a legacy adapter_model.bin (same tensors, same config)."""
    folder = world.root / "bin-adapter"
    folder.mkdir()
    shutil.copy(world.adapter / "adapter_config.json", folder)
    tensors = {k: torch.from_numpy(v) for k, v in load_numpy(world.adapter / "adapter_model.safetensors").items()}
    torch.save(tensors, folder / "adapter_model.bin")
    return folder


def test_bin_adapter_is_loaded_with_weights_only(world: World, bin_adapter: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid .bin merges like its safetensors twin, and torch.load only ever sees weights_only=True."""
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    out = world.out("from-bin")
    assert run("merge", world.base, bin_adapter, "-o", out, "-q").code == 0
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls), calls
    assert (out / "model.safetensors").read_bytes() == (world.merged / "model.safetensors").read_bytes()
    assert run("verify", world.base, bin_adapter, world.merged).code == 0
    shutil.rmtree(out)


def test_old_torch_refuses_pickles(world: World, bin_adapter: Path, pickles, monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_only=True is bypassable before torch 2.6 (CVE-2025-32434): then no pickle is opened."""
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    out = world.out()
    line = refused("merge", world.base, bin_adapter, "-o", out, culprit=bin_adapter / "adapter_model.bin", out=out)
    assert "CVE-2025-32434" in line and "2.5.1" in line
    path, culprit, marker = pickles["legacy_os_system"]
    refused("verify", world.base, path, world.merged, culprit=culprit, says=("CVE-2025-32434",))
    assert not marker.exists()


# --------------------------------------------------------------------------- adapter_config.json

CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
          "gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}
BAD_CONFIGS: dict[str, tuple[str | bytes, str]] = {  # name -> (file text, words the line must hold)
    "invalid_json": ('{"peft_type": "LORA", "r": 4,', "JSON"),
    "not_utf8": (b'{"r": 4, "lora_alpha": "\xe9"}', "cannot read"),
    "not_an_object": ("[4, 8]", "not a JSON object"),
    "deeply_nested": ("[" * 100_000, "JSON"),
    "missing_r": (json.dumps({k: v for k, v in CONFIG.items() if k != "r"}), "'r'"),
    "missing_lora_alpha": (json.dumps({k: v for k, v in CONFIG.items() if k != "lora_alpha"}), "'lora_alpha'"),
    "r_string": (json.dumps({**CONFIG, "r": "4"}), "'r'"),
    "r_bool": (json.dumps({**CONFIG, "r": True}), "'r'"),
    "r_negative": (json.dumps({**CONFIG, "r": -4}), "'r'"),
    "r_zero": (json.dumps({**CONFIG, "r": 0}), "'r'"),
    "alpha_list": (json.dumps({**CONFIG, "lora_alpha": [8]}), "'lora_alpha'"),
    "alpha_null": (json.dumps({**CONFIG, "lora_alpha": None}), "'lora_alpha'"),
    "alpha_nan": ('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "'lora_alpha'"),
    "alpha_overflows": ('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}', "'lora_alpha'"),
    "alpha_5000_digits": ('{"peft_type": "LORA", "r": 4, "lora_alpha": ' + "9" * 5000 + "}", "JSON"),
    "rank_pattern_list": (json.dumps({**CONFIG, "rank_pattern": ["q_proj"]}), "'rank_pattern'"),
    "alpha_pattern_string_value": (json.dumps({**CONFIG, "alpha_pattern": {"q_proj": "16"}}), "'alpha_pattern'"),
    "rslora_string": (json.dumps({**CONFIG, "use_rslora": "true"}), "'use_rslora'"),
    "fan_in_fan_out_int": (json.dumps({**CONFIG, "fan_in_fan_out": 1}), "'fan_in_fan_out'"),
    "target_modules_int": (json.dumps({**CONFIG, "target_modules": 7}), "'target_modules'"),
    "modules_to_save_dict": (json.dumps({**CONFIG, "modules_to_save": {"lm_head": 1}}), "'modules_to_save'"),
    "peft_type_ia3": (json.dumps({**CONFIG, "peft_type": "IA3"}), "'IA3' is not supported"),
    # LoHa is read (formats.lycoris), but its config names alpha "alpha", not "lora_alpha"
    "peft_type_loha": (json.dumps({**CONFIG, "peft_type": "LOHA"}), "missing 'alpha'"),
    "peft_type_adalora": (json.dumps({**CONFIG, "peft_type": "ADALORA"}), "'ADALORA' is not supported"),
    "peft_type_prefix": (json.dumps({**CONFIG, "peft_type": "PREFIX_TUNING"}), "'PREFIX_TUNING' is not supported"),
    "peft_type_number": (json.dumps({**CONFIG, "peft_type": 5}), "5 is not supported"),
}


@pytest.fixture(scope="module")
def bad_configs(world: World) -> dict[str, Path]:
    made = {}
    for name, (text, _) in BAD_CONFIGS.items():
        folder = shutil.copytree(world.adapter, world.root / "configs" / name)
        config = folder / "adapter_config.json"
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        made[name] = folder
    return made


@pytest.mark.parametrize("name", BAD_CONFIGS)
@pytest.mark.parametrize("command", ["merge", "verify", "blend"])
def test_bad_adapter_config(world: World, bad_configs: dict[str, Path], command: str, name: str) -> None:
    folder = bad_configs[name]
    args, out = _adapter_command(world, "blend_second" if command == "blend" else command, folder)
    refused(*args, culprit=folder / "adapter_config.json", says=(BAD_CONFIGS[name][1],), out=out)


def test_pattern_keys_that_match_nothing_are_ignored_like_peft(world: World, tmp_path: Path) -> None:
    """rank_pattern / alpha_pattern keys that match no module: PEFT warns and ignores them.

    We accept them too (exit 0) and every number is the one without them: inspect's
    figures, the merged bytes (equal to PEFT's own merge of this very folder) and verify.
    """
    folder = shutil.copytree(world.adapter, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"no_such_proj": 16, "layers.7.self_attn.q_proj": 2}
    config["alpha_pattern"] = {"no_such_proj": 99.0}
    (folder / "adapter_config.json").write_text(json.dumps(config))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught:  # PEFT's behaviour, the reference
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.base), folder)
        peft_merged = model.merge_and_unload().state_dict()
    assert any("did not match any targeted module and were ignored" in str(w.message) for w in caught)

    plain, patterned = run("inspect", world.adapter, "--json"), run("inspect", folder, "--json")
    assert plain.code == patterned.code == 0
    for ours, theirs in zip(json.loads(plain.stdout)["layers"], json.loads(patterned.stdout)["layers"]):
        assert (ours["scale"], ours["singular_values"]) == (theirs["scale"], theirs["singular_values"])

    out = tmp_path / "merged"
    assert run("merge", world.base, folder, "-o", out, "-q").code == 0
    assert (out / "model.safetensors").read_bytes() == (world.merged / "model.safetensors").read_bytes()
    merged = load_numpy(out / "model.safetensors")
    for name, tensor in peft_merged.items():
        if name in merged:
            np.testing.assert_allclose(merged[name], tensor.detach().numpy(), rtol=0, atol=2e-6)
    assert run("verify", world.base, folder, out).code == 0
    assert run("blend", folder, world.other, "--weight", 0.5, "-o", tmp_path / "blend").code == 0


# --------------------------------------------------------------------------- bad factors, NaN in a base

def _adapter_file(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    save_numpy(tensors, str(folder / "adapter_model.safetensors"))
    return folder / "adapter_model.safetensors"


def _q(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{PEFT_Q}.lora_A.weight": a, f"{PEFT_Q}.lora_B.weight": b}


RNG = np.random.default_rng(6)
A_OK, B_OK = RNG.standard_normal((4, 64)).astype(np.float32), RNG.standard_normal((64, 4)).astype(np.float32)
BAD_FACTORS: dict[str, tuple[dict[str, np.ndarray], str]] = {
    "nan_in_a": (_q(np.where(np.arange(256).reshape(4, 64) == 7, np.nan, A_OK).astype(np.float32), B_OK), "NaN or Inf"),
    "inf_in_b": (_q(A_OK, np.where(np.arange(256).reshape(64, 4) == 9, -np.inf, B_OK).astype(np.float32)), "NaN or Inf"),
    "ranks_disagree": (_q(A_OK, B_OK[:, :3].copy()), "ranks disagree"),
    "empty_factors_huge_rank": (_q(np.zeros((2**20, 0), np.float32), np.zeros((0, 2**20), np.float32)), "empty factors"),
    "does_not_fit_base": (_q(RNG.standard_normal((4, 48)).astype(np.float32), B_OK), "does not fit"),
    "integer_factor": (_q(np.ones((4, 64), np.int32), B_OK), "non-float"),
}


@pytest.fixture(scope="module")
def bad_factors(world: World) -> dict[str, Path]:
    return {name: _adapter_file(world.root / "factors" / name, tensors) for name, (tensors, _) in BAD_FACTORS.items()}


@pytest.mark.parametrize("name", BAD_FACTORS)
@pytest.mark.parametrize("command", ["merge", "verify", "blend", "inspect"])
def test_bad_factors(world: World, bad_factors: dict[str, Path], command: str, name: str) -> None:
    culprit = bad_factors[name]
    if command == "blend" and name == "does_not_fit_base":  # blend has no base: the inputs disagree
        refused("blend", world.adapter, culprit.parent, "--weight", 0.5, "-o", world.out(), culprit=culprit.parent,
                says=("different base models",), out=world.out())
        return
    if command == "inspect":
        args, out = ["inspect", culprit.parent, "--base", world.base, "--json"], None
    else:
        args, out = _adapter_command(world, "blend_second" if command == "blend" else command, culprit.parent)
    if name == "does_not_fit_base":  # found when binding to the base: the adapter (folder) is named
        culprit = culprit.parent
    refused(*args, culprit=culprit, says=(BAD_FACTORS[name][1],), out=out)


@pytest.fixture(scope="module")
def nan_base(world: World) -> Path:
    """The base with one NaN in an adapted weight (q_proj of layer 0)."""
    folder = shutil.copytree(world.base, world.root / "nan-base")
    tensors = load_numpy(folder / "model.safetensors")
    tensors[f"{Q_PROJ}.weight"][3, 5] = np.nan
    save_numpy(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("command", ["merge", "verify", "inspect"])
def test_nan_in_base_names_the_base(world: World, nan_base: Path, command: str) -> None:
    args, out = _base_command(world, command, nan_base)
    line = refused(*args, culprit=nan_base / "model.safetensors", says=("NaN or Inf", f"{Q_PROJ}.weight"), out=out)
    assert str(world.adapter) not in line


@pytest.fixture(scope="module")
def int_base(world: World) -> Path:
    """The base with an adapted weight (q_proj of layer 0) stored as integers."""
    folder = shutil.copytree(world.base, world.root / "int-base")
    tensors = load_numpy(folder / "model.safetensors")
    tensors[f"{Q_PROJ}.weight"] = np.round(tensors[f"{Q_PROJ}.weight"] * 1000).astype(np.int32)
    save_numpy(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("command", ["merge", "verify", "inspect"])
def test_adapter_on_an_integer_base_weight(world: World, int_base: Path, command: str) -> None:
    """A LoRA update on an I32 tensor would be truncated to integers: refused, not merged."""
    args, out = _base_command(world, command, int_base)
    refused(*args, culprit=world.adapter, says=(f"{Q_PROJ}.weight", "I32", "not a float tensor"), out=out)


def test_diffusers_metadata_with_a_string_flag(diffusers_current_case, tmp_path: Path) -> None:
    """"use_rslora": "false" is a true string in Python: refused rather than read as rsLoRA."""
    from safetensors import safe_open

    with safe_open(str(diffusers_current_case.lora_file), framework="np") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.use_rslora"] = "false"
    path = tmp_path / "pytorch_lora_weights.safetensors"
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(diffusers_current_case.lora_file))
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    out = tmp_path / "merged.safetensors"
    refused("inspect", path, culprit=path, says=("use_rslora", "'false'"))
    refused("merge", diffusers_current_case.base_file, path, "-o", out, culprit=path, says=("use_rslora",), out=out)


@pytest.mark.parametrize("method", ["svd", "cat"])
def test_blend_of_factors_whose_product_overflows(world: World, tmp_path: Path, method: str) -> None:
    culprit = _adapter_file(tmp_path / "huge", _q(np.full((4, 64), 1e200), np.full((64, 4), 1e200)))
    out = tmp_path / "mix"
    refused("blend", culprit.parent, world.adapter, "--weight", 0.5, "--method", method, "-o", out,
            culprit=culprit.parent, out=out)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_merged_is_never_equivalent(world: World, tmp_path: Path, value: float) -> None:
    """A merge that stored NaN or Inf is a failed check (exit 1), in the table and in --json."""
    merged = shutil.copytree(world.merged, tmp_path / "merged")
    tensors = load_numpy(merged / "model.safetensors")
    tensors[f"{Q_PROJ}.weight"][3, 5] = value
    save_numpy(tensors, str(merged / "model.safetensors"), metadata={"format": "pt"})
    table = run("verify", world.base, world.adapter, merged)
    assert table.code == 1 and "NOT EQUIVALENT" in table.stdout and "NaN or Inf" in table.stdout
    document = run("verify", world.base, world.adapter, merged, "--json")
    assert document.code == 1 and document.stderr == ""
    report = json.loads(document.stdout)  # strict JSON: no NaN/Infinity tokens
    check = next(t for t in report["tensors"] if t["name"] == f"{Q_PROJ}.weight")
    assert check["verdict"] == "mismatch" and "[3, 5]" in check["detail"] and not report["equivalent"]


def test_verify_json_stays_json_with_zero_tolerance(world: World, tmp_path: Path) -> None:
    """--atol 0 --rtol 0: an error over a zero tolerance is infinitely many tolerances: null in JSON."""
    merged = shutil.copytree(world.merged, tmp_path / "merged")
    tensors = load_numpy(merged / "model.safetensors")
    tensors[f"{Q_PROJ}.weight"][0, 0] += 10.0  # 10 / the smallest float64 overflows
    save_numpy(tensors, str(merged / "model.safetensors"), metadata={"format": "pt"})
    document = run("verify", world.base, world.adapter, merged, "--json", "--atol", 0, "--rtol", 0)
    assert document.code == 1 and document.stderr == ""
    check = next(t for t in json.loads(document.stdout)["tensors"] if t["name"] == f"{Q_PROJ}.weight")
    assert check["verdict"] != "ok" and check["worst_ulps"] is None


def test_markup_in_names_is_text(world: World, tmp_path: Path) -> None:
    """Paths and tensor names are the user's text: "[/]" in them is not Rich markup."""
    merged = shutil.copytree(world.merged, tmp_path / "merged [/] [bold]")
    tensors = load_numpy(merged / "model.safetensors")
    tensors["extra.[/red].weight"] = np.ones(2, np.float32)
    save_numpy(tensors, str(merged / "model.safetensors"), metadata={"format": "pt"})
    outcome = run("verify", world.base, world.adapter, merged)
    assert outcome.code == 1 and "'extra.[/red].weight' is not in the base" in outcome.stdout


# --------------------------------------------------------------------------- paths

def test_missing_paths(world: World) -> None:
    gone = world.root / "no-such-thing"
    out = world.out()
    refused("merge", gone, world.adapter, "-o", out, culprit=gone, says=("no such file",), out=out)
    refused("merge", world.base, gone, "-o", out, culprit=gone, says=("no such file",), out=out)
    refused("merge", world.base, world.adapter, gone, "-o", out, culprit=gone, out=out)
    refused("verify", gone, world.adapter, world.merged, culprit=gone)
    refused("verify", world.base, gone, world.merged, culprit=gone)
    refused("verify", world.base, world.adapter, gone, culprit=gone)
    refused("blend", world.adapter, gone, "--weight", 0.5, "-o", out, culprit=gone, out=out)
    refused("blend", gone, world.adapter, "--weight", 0.5, "-o", out, culprit=gone, out=out)
    refused("inspect", world.adapter, "--base", gone, culprit=gone)
    refused("merge", world.base, world.adapter, "-o", gone / "deeper" / "out", culprit=gone, says=("does not exist",))


@pytest.fixture(scope="module")
def folder_for_file(world: World) -> dict[str, tuple[Path, Path]]:
    """name -> (path to pass, path the error names) where a file was expected and a folder is."""
    root = world.root / "folder-for-file"
    made: dict[str, tuple[Path, Path]] = {}
    weights = shutil.copytree(world.adapter, root / "adapter-weights-dir")
    (weights / "adapter_model.safetensors").unlink()
    (weights / "adapter_model.safetensors").mkdir()
    made["adapter_weights"] = (weights, weights)
    config = shutil.copytree(world.adapter, root / "adapter-config-dir")
    (config / "adapter_config.json").unlink()
    (config / "adapter_config.json").mkdir()
    made["adapter_config"] = (config, config)
    named = root / "adapter.safetensors"
    named.mkdir(parents=True)
    made["adapter_file"] = (named, named)
    model = shutil.copytree(world.base, root / "base-model-dir")
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    made["base_model"] = (model, model)
    return made


@pytest.mark.parametrize("name", ["adapter_weights", "adapter_config", "adapter_file"])
@pytest.mark.parametrize("command", ["merge", "verify", "blend"])
def test_folder_where_adapter_file_expected(world: World, folder_for_file, command: str, name: str) -> None:
    path, culprit = folder_for_file[name]
    args, out = _adapter_command(world, "blend_first" if command == "blend" else command, path)
    refused(*args, culprit=culprit, out=out)


@pytest.mark.parametrize("command", ["merge", "verify", "inspect"])
def test_folder_where_base_file_expected(world: World, folder_for_file, command: str) -> None:
    path, culprit = folder_for_file["base_model"]
    args, out = _base_command(world, command, path)
    refused(*args, culprit=culprit, out=out)
    refused("verify", world.base, world.adapter, path, culprit=culprit)  # as MERGED


def test_not_a_checkpoint_at_all(world: World) -> None:
    config = world.base / "config.json"
    out = world.out()
    refused("merge", config, world.adapter, "-o", out, culprit=config, out=out)
    refused("merge", world.base, config, "-o", out, culprit=config, out=out)
    refused("verify", world.base, world.adapter, config, culprit=config)
    refused("merge", world.adapter, world.adapter, "-o", out, culprit=world.adapter, says=("PEFT adapter",), out=out)


# OUT overlapping an input: refused before anything is written, with or without --force.

def _overlaps(world: World) -> list[tuple[str, list[object], Path]]:
    base_file_link = world.root / "links" / "base-link.safetensors"
    if not base_file_link.exists():
        base_file_link.parent.mkdir(exist_ok=True)
        base_file_link.symlink_to(world.base_file)
    adapter_file = world.adapter / "adapter_model.safetensors"
    return [
        ("merge_out_is_base", ["merge", world.base, world.adapter, "-o", world.base], world.base),
        ("merge_out_is_base_file", ["merge", world.base_file, world.adapter, "-o", world.base_file], world.base_file),
        ("merge_out_is_adapter", ["merge", world.base, world.adapter, "-o", world.adapter], world.adapter),
        ("merge_out_is_adapter_file", ["merge", world.base_file, adapter_file, "-o", adapter_file], adapter_file),
        ("merge_out_in_base", ["merge", world.base, world.adapter, "-o", world.base / "merged"], world.base / "merged"),
        ("merge_out_links_to_base", ["merge", world.base_file, world.adapter, "-o", base_file_link], base_file_link),
        ("merge_out_holds_inputs", ["merge", world.base, world.adapter, "-o", world.root], world.root),
        ("blend_out_is_adapter", ["blend", world.adapter, world.other, "--weight", 0.5, "-o", world.adapter], world.adapter),
        ("blend_out_is_second", ["blend", world.adapter, world.other, "--weight", 0.5, "-o", world.other], world.other),
        ("blend_out_in_adapter", ["blend", world.adapter, world.other, "--weight", 0.5, "-o", world.adapter / "mix"],
         world.adapter / "mix"),
        ("blend_out_is_adapter_file", ["blend", adapter_file, world.other, "--weight", 0.5, "-o", adapter_file], adapter_file),
    ]


OVERLAPS = ("merge_out_is_base", "merge_out_is_base_file", "merge_out_is_adapter", "merge_out_is_adapter_file",
            "merge_out_in_base", "merge_out_links_to_base", "merge_out_holds_inputs", "blend_out_is_adapter",
            "blend_out_is_second", "blend_out_in_adapter", "blend_out_is_adapter_file")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("name", OVERLAPS)
def test_out_overlapping_an_input(world: World, name: str, force: bool) -> None:
    args, out = {case: (args, out) for case, args, out in _overlaps(world)}[name]
    refused(*args, *(["--force"] if force else []), culprit=out, says=("overlaps the input",), out=out)


def test_plot_never_overwrites_an_input(world: World, tmp_path: Path) -> None:
    """--plot onto the adapter, a file in it or in the base: refused; a plot beside them is fine."""
    adapter = shutil.copytree(world.adapter, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    for plot in (weights, adapter / "adapter_config.json", adapter):
        refused("inspect", adapter, "--plot", plot, culprit=plot, says=("would overwrite the input",))
    refused("inspect", weights, "--plot", weights, culprit=weights, says=("would overwrite the input",))
    refused("inspect", adapter, "--base", world.base, "--plot", world.base / "config.json",
            culprit=world.base / "config.json", says=("would overwrite the input",))
    report = adapter / "report.png"
    before = sha256_tree(adapter)
    for _ in range(2):  # the second replaces the first plot
        assert CliRunner().invoke(cli, ["inspect", str(adapter), "--plot", str(report)]).exit_code == 0
    assert report.read_bytes().startswith(b"\x89PNG")
    report.unlink()
    assert sha256_tree(adapter) == before


def test_out_hardlinked_to_base_is_replaced_not_written_through(world: World, tmp_path: Path) -> None:
    """A hard link cannot be told from a new name, but --force replaces the link, never the base's bytes."""
    base = shutil.copy(world.base_file, tmp_path / "base.safetensors")
    link = tmp_path / "merged.safetensors"
    os.link(base, link)
    before = sha256_tree(Path(base))
    assert run("merge", Path(base), world.adapter, "-o", link, "--force", "-q").code == 0
    assert sha256_tree(Path(base)) == before
    assert os.stat(base).st_ino != os.stat(link).st_ino
    assert run("verify", Path(base), world.adapter, link).code == 0


# --------------------------------------------------------------------------- unreadable files

_DRIVER = r"""
import json, sys
from click.testing import CliRunner
from lora_tools.cli import cli
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli, args)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    results.append([result.exit_code, result.stdout, result.stderr, repr(result.exception) if crashed else None])
print(json.dumps(results))
"""

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _without_root_file_access() -> None:
    """preexec_fn: drop the capabilities that let root ignore permission bits (Linux).

    Root reads a chmod 000 file; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in its
    bounding set, the exec'd root process is held to the mode bits like anyone else.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_unprivileged(commands: list[list[str]], probe: Path) -> list[list]:
    """Run the commands in one process that permission bits apply to (skip where none can)."""
    preexec = None
    if os.geteuid() == 0:
        if not sys.platform.startswith("linux"):
            pytest.skip("running as root, and dropping root's file access needs Linux capabilities")
        preexec = _without_root_file_access
    check = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], preexec_fn=preexec,
                           capture_output=True, timeout=60)
    if check.returncode == 0:
        pytest.skip("permission bits are not enforced here (root with capabilities that cannot be dropped?)")
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands)], preexec_fn=preexec,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _unreadable_cases(world: World, root: Path, direct: bool) -> list[tuple[list[object], Path, Path]]:
    """(args, path to lock, path the line must name). direct: the locked path is the argument."""
    adapter, out = world.adapter, root / "out"

    def copy(source: Path, name: str, locked: str | None = None) -> tuple[Path, Path]:
        folder = shutil.copytree(source, root / name)
        return folder, (folder / locked if locked else folder)

    if direct:
        lone = root / "lone" / "adapter.safetensors"
        lone.parent.mkdir()
        shutil.copy(adapter / "adapter_model.safetensors", lone)
        folder, _ = copy(adapter, "a-folder")
        return [(["blend", lone, world.other, "--weight", 0.5, "-o", out], lone, lone),
                (["merge", world.base, folder, "-o", out], folder, folder),
                (["verify", world.base, adapter, lone], lone, lone)]
    cases: list[tuple[list[object], Path, Path]] = []
    folder, locked = copy(adapter, "a-weights", "adapter_model.safetensors")
    cases.append((["merge", world.base, folder, "-o", out], locked, locked))
    folder, locked = copy(adapter, "a-config", "adapter_config.json")
    cases.append((["verify", world.base, folder, world.merged], locked, locked))
    folder = root / "a-bin"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    tensors = {k: torch.from_numpy(v) for k, v in load_numpy(adapter / "adapter_model.safetensors").items()}
    torch.save(tensors, folder / "adapter_model.bin")
    cases.append((["blend", folder, world.other, "--weight", 0.5, "-o", out], folder / "adapter_model.bin",
                  folder / "adapter_model.bin"))
    folder, locked = copy(world.base, "b-model", "model.safetensors")
    cases.append((["merge", folder, adapter, "-o", out], locked, locked))
    cases.append((["inspect", adapter, "--base", folder], locked, locked))
    shard = sorted(world.sharded.glob("model-*.safetensors"))[1].name
    folder, locked = copy(world.sharded, "b-shard", shard)
    cases.append((["verify", folder, adapter, world.merged_sharded], locked, locked))
    folder, locked = copy(world.sharded, "b-index", INDEX)
    cases.append((["merge", folder, adapter, "-o", out], locked, locked))
    folder, locked = copy(world.sharded, "b-tokenizer", "tokenizer.json")  # a file merge copies
    cases.append((["merge", folder, adapter, "-o", out], locked, locked))
    folder, locked = copy(world.merged, "m-model", "model.safetensors")
    cases.append((["verify", world.base, adapter, folder], locked, locked))
    shut = root / "read-only-folder"  # chmod 555: OUT cannot be created in it
    shut.mkdir()
    cases.append((["merge", world.base, adapter, "-o", shut / "merged"], shut, shut / "merged"))
    cases.append((["blend", adapter, world.other, "--weight", 0.5, "-o", shut / "mix"], shut, shut / "mix"))
    return cases


@pytest.mark.parametrize("direct", [
    False,
    True,
], ids=["inside", "direct"])
def test_unreadable_inputs(world: World, tmp_path: Path, direct: bool) -> None:
    """chmod 000 (or an output folder without write permission): one line naming the file,
    "Permission denied". inside: the locked file is in a folder given on the command line;
    direct: the locked file or folder is the argument itself."""
    cases = _unreadable_cases(world, tmp_path, direct)
    probe = tmp_path / "probe"
    probe.write_text("secret")
    watched = sorted({a for args, _, _ in cases for a in args if isinstance(a, Path) and a.exists()})
    before = sha256_tree(*watched)
    modes = {locked: locked.stat().st_mode for _, locked, _ in cases}
    for locked in modes:
        locked.chmod(0o555 if locked.is_dir() and locked.name == "read-only-folder" else 0)
    probe.chmod(0)
    try:
        results = _run_unprivileged([[str(a) for a in args] for args, _, _ in cases], probe)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    wrong = []
    for (args, _, culprit), (code, stdout, stderr, crash) in zip(cases, results):
        lines = stderr.splitlines()
        if crash or code != 2 or stdout or len(lines) != 1 or str(culprit) not in lines[0] or "ermission denied" not in lines[0]:
            wrong.append((args[0], str(culprit), code, crash, stderr))
    assert wrong == []
    assert sha256_tree(*watched) == before
    assert not (tmp_path / "out").exists() and list((tmp_path / "read-only-folder").iterdir() if not direct else []) == []
    assert [p.name for p in tmp_path.iterdir() if TMP_MARKER in p.name] == []
