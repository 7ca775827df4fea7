"""Fuzzing whole folders through the command line (issue #12): the contract holds for any input.

test_fuzz.py mutates one file at a time and calls the library; here an example is a
*folder* pair, an adapter (config + weights) and a base (config, index, shards, extra
files, links), each mutated by a list of edits a careless tool or an attacker could
make, and a command run through the CLI on them: inspect (with or without --base),
merge (sometimes --dtype fp16, sometimes weights), verify after a merge, blend. For every
example:

- the exit status is 0, or 1 for a verify that found a difference, or 2;
- with 2, stdout is empty and stderr is exactly one line (no traceback: an exception
  other than SystemExit fails the test through run_cli, as an internal error);
- the inputs are unchanged (every file's bytes and every link's target), and a file
  outside the folders that a link points at was neither changed nor copied into OUT;
- no temporary sibling is left next to OUT, and a failed command left no OUT.

A hundred examples run in the default suite (~3 s); `pytest -m slow tests/test_fuzz_folders.py`
runs 2,000 (~40 s on two cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from cli_run import run_cli

FAST = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLOW = settings(deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow])

HIDDEN = 8
SECRET = b"root:x:0:0:not-for-your-model-folder\n"
P = "base_model.model.model.layers"


def _seed_base(folder: Path) -> None:
    """Two shards and an index, config, a tokenizer file: a tiny Llama-named base."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    shards: dict[str, dict[str, np.ndarray]] = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for layer in range(2):
        shard = shards[f"model-0000{layer + 1}-of-00002.safetensors"]
        for module in ("self_attn.q_proj", "self_attn.v_proj"):
            shard[f"model.layers.{layer}.{module}.weight"] = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
        shard[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    shards["model-00002-of-00002.safetensors"]["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(t.nbytes for tensors in shards.values() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32", "tie_word_embeddings": False}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')


def _seed_adapter(folder: Path) -> None:
    rng = np.random.default_rng(2)
    folder.mkdir()
    tensors = {}
    for layer in range(2):
        for module in ("self_attn.q_proj", "self_attn.v_proj"):
            tensors[f"{P}.{layer}.{module}.lora_A.weight"] = rng.standard_normal((4, HIDDEN)).astype(np.float32)
            tensors[f"{P}.{layer}.{module}.lora_B.weight"] = rng.standard_normal((HIDDEN, 4)).astype(np.float32) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "seed", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------- edits

CONFIG_VALUES: list[Any] = [
    0, -1, 2, 4, 16, 1e9, -2.5, float("nan"), "4", None, True, [], {}, [1, 2], "(a+)+$", ".*",
    {"q_proj": -2}, {"(.*)*(.*)*z": 3}, {"model.layers.0.self_attn.q_proj": 0}, {"v_proj": 8}, {".*": "x"},
]
CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "target_modules",
               "peft_type", "fan_in_fan_out", "modules_to_save", "layers_to_transform"]


def _edit_config(folder: Path, draw: Any) -> str:
    path = folder / "adapter_config.json"
    kind = draw(st.sampled_from(["set", "delete", "truncate", "not a dict", "remove"]))
    if kind == "remove":
        path.unlink()
        return kind
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, 40))])
        return kind
    if kind == "not a dict":
        path.write_text(json.dumps(draw(st.sampled_from([[], "x", 3, None]))))
        return kind
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return "config already broken"
    if not isinstance(config, dict):
        return "config already broken"
    key = draw(st.sampled_from(CONFIG_KEYS))
    if kind == "delete":
        config.pop(key, None)
    else:
        config[key] = draw(st.sampled_from(CONFIG_VALUES))
    path.write_text(json.dumps(config))
    return f"config {kind} {key}"


def _edit_tensors(path: Path, draw: Any, names: list[str]) -> str:
    try:
        tensors = dict(load_file(str(path)))
    except Exception:  # noqa: BLE001 - an earlier edit broke the file: nothing to edit structurally
        return "tensors already broken"
    kind = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "nan", "rename", "truncate", "junk header"]))
    name = draw(st.sampled_from(sorted(tensors) or names or ["x.weight"]))
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, max(0, path.stat().st_size - 1)))])
        return kind
    if kind == "junk header":
        data = bytearray(path.read_bytes())
        at = draw(st.integers(8, min(len(data) - 1, 200)))
        data[at] = draw(st.integers(0, 255))
        path.write_bytes(bytes(data))
        return kind
    if kind == "drop":
        tensors.pop(name, None)
    elif kind == "extra":
        tensors[draw(st.sampled_from(["unknown.weight", "base_model.model.lm_head.weight", f"{name}.bias", "\x1b[2J.weight"]))] = (
            np.zeros(3, np.float32))
    elif kind == "shape" and name in tensors:
        tensors[name] = np.zeros(draw(st.sampled_from([(3,), (HIDDEN + 1, 4), (4, HIDDEN, 1), (0, HIDDEN)])), np.float32)
    elif kind == "dtype" and name in tensors:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN or huge values cast to integers: junk is the point
            tensors[name] = tensors[name].astype(draw(st.sampled_from([np.float16, np.int32, np.uint8, np.float64])))
    elif kind == "nan" and name in tensors and tensors[name].size:
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = draw(st.sampled_from([np.nan, np.inf, 1e38, -1e6]))
    elif kind == "rename" and name in tensors:
        tensors[draw(st.sampled_from([name.replace("layers.0", "layers.7"), name + "x", "a\nb.weight"]))] = tensors.pop(name)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return f"tensors {kind}"


def _edit_links(folder: Path, draw: Any, outside: Path) -> str:
    kind = draw(st.sampled_from(["to secret", "to outside dir", "loop", "dangling", "subfolder link", "weights link"]))
    name = draw(st.sampled_from(["tokenizer.json", "special_tokens_map.json", "extra", "adapter_config.json"]))
    target = folder / name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    if kind == "to secret":
        target.symlink_to(outside / "secret.txt")
    elif kind == "to outside dir":
        target.symlink_to(outside)
    elif kind == "loop":
        target.symlink_to(".")
    elif kind == "dangling":
        target.symlink_to(folder / "nowhere")
    elif kind == "subfolder link":
        if not (folder / "sub").is_symlink():
            (folder / "sub").symlink_to(outside)
    else:  # a weights file that is a link out of the folder
        weights = next((p for p in sorted(folder.glob("*.safetensors")) if not p.is_symlink()), None)
        if weights is not None and not (outside / weights.name).exists():
            shutil.copy2(weights, outside / weights.name)
            weights.unlink()
            weights.symlink_to(outside / weights.name)
    return f"link {kind}"


def _edit_index(folder: Path, draw: Any) -> str:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    kind = draw(st.sampled_from(["drop entry", "missing shard", "escape", "not strings", "no map"]))
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        return "index already broken"
    names = sorted(index["weight_map"])
    if kind == "drop entry":
        index["weight_map"].pop(draw(st.sampled_from(names)))
    elif kind == "missing shard":
        index["weight_map"][draw(st.sampled_from(names))] = "model-00009-of-00009.safetensors"
    elif kind == "escape":
        index["weight_map"][draw(st.sampled_from(names))] = draw(st.sampled_from(["../secret.txt", "/etc/passwd", "sub/../../x"]))
    elif kind == "not strings":
        index["weight_map"][draw(st.sampled_from(names))] = draw(st.sampled_from([3, None, ["a"]]))
    else:
        index.pop("weight_map")
    path.write_text(json.dumps(index))
    return f"index {kind}"


# --------------------------------------------------------------------------- the property


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: a file's sha256, a link's target, a folder's mark (never following links)."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                seen[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = "special"
    return seen


def _holds_secret(out: Path) -> bool:
    if not out.exists():
        return False
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    return any(SECRET in p.read_bytes() for p in files)


def _case(draw: Any) -> dict[str, Any]:
    """What to edit and which command to run, drawn from hypothesis' data."""
    return {
        "adapter": draw(st.lists(st.sampled_from(["config", "tensors", "links"]), max_size=2)),
        "base": draw(st.lists(st.sampled_from(["tensors", "links", "index", "config"]), max_size=2)),
        "command": draw(st.sampled_from(["inspect", "inspect --base", "merge", "merge fp16", "merge weights", "blend"])),
        "draw": draw,
    }


def _apply(case: dict[str, Any], root: Path) -> tuple[Path, Path, Path]:
    draw = case["draw"]
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    work = root / "work"
    work.mkdir()
    base, adapter = work / "base", work / "adapter"
    _seed_base(base)
    _seed_adapter(adapter)
    for edit in case["adapter"]:
        if edit == "config" and (adapter / "adapter_config.json").is_file() and not (adapter / "adapter_config.json").is_symlink():
            event(_edit_config(adapter, draw))
        elif edit == "tensors" and (adapter / "adapter_model.safetensors").is_file() and not (adapter / "adapter_model.safetensors").is_symlink():
            event(_edit_tensors(adapter / "adapter_model.safetensors", draw, []))
        elif edit == "links":
            event(_edit_links(adapter, draw, outside))
    for edit in case["base"]:
        if edit == "tensors":
            shard = base / draw(st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]))
            if shard.is_file() and not shard.is_symlink():
                event(_edit_tensors(shard, draw, []))
        elif edit == "links":
            event(_edit_links(base, draw, outside))
        elif edit == "index" and (base / "model.safetensors.index.json").is_file() and not (base / "model.safetensors.index.json").is_symlink():
            event(_edit_index(base, draw))
        elif edit == "config":
            (base / "config.json").write_text(json.dumps(draw(st.sampled_from(
                [{"tie_word_embeddings": True}, {"torch_dtype": "int8"}, [], {"quantization_config": {"quant_method": "fp8"}}]))))
    return base, adapter, outside


def _check(case: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="lora-fuzz-folders-") as tmp:
        root = Path(tmp)
        base, adapter, outside = _apply(case, root)
        before = {"work": _snapshot(root / "work"), "outside": _snapshot(outside)}
        out = root / "out"
        command = case["command"]
        if command == "inspect":
            args: list[object] = ["inspect", adapter]
        elif command == "inspect --base":
            args = ["inspect", adapter, "--base", base, "--json"]
        elif command == "blend":
            args = ["blend", adapter, adapter, "--weight", "0.5", "-o", out]
        else:
            args = ["merge", base, adapter, "-o", out, "--device", "cpu", "-q"]
            args += {"merge fp16": ["--dtype", "fp16"], "merge weights": ["--weight", "0.5"]}.get(command, [])
        code, stdout, stderr = run_cli(*args)
        event(f"{command}: exit {code}")
        assert code in (0, 2), (command, code, stderr)
        if code == 2:
            assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
            assert command.startswith("inspect") or stdout == "", stdout
            assert not out.exists() and not out.is_symlink()
        if code == 0 and command.startswith("merge"):
            weights = ["--weight", "0.5"] if command == "merge weights" else []
            v_code, _, v_err = run_cli("verify", base, adapter, out, *weights)
            assert v_code in (0, 1), v_err  # fp16 rounding may make a tiny update inconclusive, never a crash
        assert not _holds_secret(out), "a file from outside the inputs was copied into OUT"
        assert {"work": _snapshot(root / "work"), "outside": _snapshot(outside)} == before, "an input changed"
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".") and "lora-tools" in p.name]
        assert not leftovers, leftovers


def test_seeds_merge_and_verify() -> None:
    """The unmutated folders are valid: every command succeeds on them (so failures are the edits')."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _seed_base(root / "base")
        _seed_adapter(root / "adapter")
        assert run_cli("inspect", root / "adapter", "--base", root / "base")[0] == 0
        assert run_cli("merge", root / "base", root / "adapter", "-o", root / "out", "--device", "cpu", "-q")[0] == 0
        assert run_cli("verify", root / "base", root / "adapter", root / "out")[0] == 0
        assert run_cli("blend", root / "adapter", root / "adapter", "--weight", "0.5", "-o", root / "mix")[0] == 0


@FAST
@given(st.data())
def test_fuzz_folders(data: st.DataObject) -> None:
    _check(_case(data.draw))


@pytest.mark.slow
@SLOW
@given(st.data())
def test_fuzz_folders_long(data: st.DataObject) -> None:
    _check(_case(data.draw))
