"""Hostile numbers and names (issue #12): values past the output dtype's range, absurd
weights, and control characters in names that come from inside files.

Same contract as test_hostile.py: status 2, one stderr line naming the file at fault,
no traceback, nothing half-written, inputs unchanged (`refused` checks all of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import PeftCase
from cli_run import run_cli
from lora_tools.errors import printable
from test_hostile import _join, _split, refused, run

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def _copy_base(base: Path, tmp_path: Path, changes: dict[str, float], name: str = "base") -> Path:
    """A copy of `base` whose tensors in `changes` have element [0] (flat) set to the value."""
    out = tmp_path / name
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    for key, value in changes.items():
        tensors[key].view(-1)[0] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _set_element(file: Path, key: str, value: float) -> None:
    tensors = load_file(file)
    tensors[key].view(-1)[0] = value
    save_file(tensors, file, metadata={"format": "pt"})


def _file_order(file: Path) -> list[str]:
    header, _, _ = _split(file.read_bytes())
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


# --------------------------------------------------------------------------- 3: --dtype overflow

@pytest.mark.parametrize("changed", [Q_PROJ, NORM])
def test_merge_fp16_refuses_a_base_value_past_its_range(
    llama_plain_case: PeftCase, tmp_path: Path, changed: str
) -> None:
    """An adapted (q_proj, 1e5) or an unadapted (norm, 1e6) base value past fp16's range:
    no silent ±inf, the tensor and the base file named."""
    base = _copy_base(llama_plain_case.base_dir, tmp_path, {changed: 1e5 if changed == Q_PROJ else 1e6})
    out = tmp_path / "out"
    line = refused("merge", base, llama_plain_case.adapter_dir, "-o", out, "--dtype", "fp16", "-q",
                   culprit=base / "model.safetensors", says=(repr(changed), "float16"), out=out)
    assert "NaN" not in line


def test_merge_fp16_names_the_first_tensor_that_overflows(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base = _copy_base(llama_plain_case.base_dir, tmp_path, {Q_PROJ: 1e5, NORM: 1e6})
    first = next(k for k in _file_order(base / "model.safetensors") if k in (Q_PROJ, NORM))
    other = NORM if first == Q_PROJ else Q_PROJ
    out = tmp_path / "out"
    line = refused("merge", base, llama_plain_case.adapter_dir, "-o", out, "--dtype", "fp16", "-q",
                   culprit=base / "model.safetensors", says=(repr(first),), out=out)
    assert repr(other) not in line


def test_merge_fp16_refuses_an_update_past_its_range(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """A finite float32 merge result that only overflows when rounded to fp16: the base
    alone fits, so the adapter (at this weight) is at fault."""
    out = tmp_path / "out"
    line = refused("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out,
                   "--dtype", "fp16", "--weight", "1e9", "-q",
                   culprit=llama_plain_case.adapter_dir, says=("float16",), out=out)
    assert "NaN" not in line


def test_merge_keep_of_an_fp16_base_refuses_an_update_past_its_range(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """--dtype keep of a float16 base: the check that the plain hot path skips when the
    update is provably small (`_fits_surely`) runs, and refuses, when it is not."""
    base = tmp_path / "base16"
    shutil.copytree(llama_plain_case.base_dir, base)
    tensors = {k: v.half() for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert run_cli("merge", base, llama_plain_case.adapter_dir, "-o", tmp_path / "fine", "-q")[0] == 0
    out = tmp_path / "out"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, "--weight", "1e9", "-q",
            culprit=llama_plain_case.adapter_dir, says=("float16",), out=out)


def test_the_hot_path_skips_the_result_check_for_small_updates(llama_plain_case: PeftCase, llama_bf16_base_dir: Path) -> None:
    from lora_tools.engine.placement import factors_on
    from lora_tools.engine.plan import is_plain, make_plan
    from lora_tools.merge import _fits_surely

    plan = make_plan(llama_bf16_base_dir, [llama_plain_case.adapter_dir], place=factors_on(torch.device("cpu")))
    try:
        plain = [p for p in plan.tensors.values() if is_plain(p)]
        assert plain and all(_fits_surely(p, torch.bfloat16, torch.bfloat16) for p in plain)
        assert not any(_fits_surely(p, torch.float32, torch.float16) for p in plain)  # fp32 W0 may not fit
    finally:
        plan.close()


def test_merge_keep_and_fp32_still_write_large_values(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """Values fp32 holds are no problem: the same base merges with --dtype keep."""
    base = _copy_base(llama_plain_case.base_dir, tmp_path, {Q_PROJ: 1e5, NORM: 1e6})
    outcome = run("merge", base, llama_plain_case.adapter_dir, "-o", tmp_path / "out", "-q")
    assert outcome.code == 0, outcome
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged[NORM].view(-1)[0] == 1e6 and all(bool(torch.isfinite(t).all()) for t in merged.values())


@pytest.mark.parametrize("changed", [Q_PROJ, NORM])
def test_cuda_staging_logic_refuses_the_overflow_too(
    llama_plain_case: PeftCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed: str
) -> None:
    """The GPU path (chunked staging, run on the CPU with no-op events as in test_merge)
    converts and computes on the device: its results are checked as well."""
    import contextlib

    import lora_tools.engine.stream as stream_module
    from lora_tools.engine import staging

    class Event:
        def record(self) -> None: ...

        def synchronize(self) -> None: ...

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(stream_module, "staging_for", lambda device, *_: staging.CudaStaging(device, chunk_bytes=64))
    base = _copy_base(llama_plain_case.base_dir, tmp_path, {changed: 1e6})
    out = tmp_path / "out"
    refused("merge", base, llama_plain_case.adapter_dir, "-o", out, "--dtype", "fp16", "--device", "cpu", "-q",
            culprit=base / "model.safetensors", says=(repr(changed), "float16"), out=out)


def _inf_merge(case: PeftCase, tmp_path: Path, changed: str) -> tuple[Path, Path]:
    """(base with 1e6 in `changed`, a fp16 merge of it that stores +inf there): what
    merge wrote before the fix."""
    base = _copy_base(case.base_dir, tmp_path, {changed: 1e6})
    merged = tmp_path / "merged"
    assert run_cli("merge", case.base_dir, case.adapter_dir, "-o", merged, "--dtype", "fp16", "-q")[0] == 0
    _set_element(merged / "model.safetensors", changed, float("inf"))
    return base, merged


def test_verify_fails_an_unadapted_tensor_that_became_inf(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base, merged = _inf_merge(llama_plain_case, tmp_path, NORM)
    code, stdout, _ = run_cli("verify", base, llama_plain_case.adapter_dir, merged, "--json")
    report = json.loads(stdout)
    assert code == 1 and not report["equivalent"]
    assert NORM in report["changed_unadapted"]


def test_verify_fails_an_adapted_tensor_that_became_inf(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base, merged = _inf_merge(llama_plain_case, tmp_path, Q_PROJ)
    code, stdout, _ = run_cli("verify", base, llama_plain_case.adapter_dir, merged, "--json")
    report = json.loads(stdout)
    assert code == 1 and not report["equivalent"]
    (check,) = [t for t in report["tensors"] if t["name"] == Q_PROJ]
    assert check["verdict"] == "mismatch"


def test_verify_still_accepts_a_faithful_conversion(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", merged, "--dtype", "fp16", "-q")[0] == 0
    code, stdout, _ = run_cli("verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir, merged, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["n_unadapted_converted"] == report["n_unadapted"] > 0


# --------------------------------------------------------------------------- 14: absurd weights

BAD_WEIGHTS = ["nan", "inf", "-inf", "1e308", "-1e31"]


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_merge_refuses_a_weight_that_is_not_a_usable_number(llama_plain_case: PeftCase, tmp_path: Path, weight: str) -> None:
    out = tmp_path / "out"
    line = refused("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out, "--weight", weight, "-q",
                   culprit=llama_plain_case.adapter_dir, says=("--weight",), out=out)
    assert "produced" not in line


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_verify_refuses_a_weight_that_is_not_a_usable_number(
    llama_plain_case: PeftCase, merged_plain: Path, weight: str
) -> None:
    line = refused("verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir, merged_plain, "--weight", weight,
                   culprit=llama_plain_case.adapter_dir, says=("--weight",))
    assert "produced" not in line


def test_the_weight_bound_is_inclusive_and_names_the_adapter(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    from lora_tools.engine.weights import MAX_WEIGHT, check_weights
    from lora_tools.errors import RequestError

    check_weights([MAX_WEIGHT, -MAX_WEIGHT, 0.0], ["a", "b", "c"])
    check_weights(None, ["a"])
    with pytest.raises(RequestError, match=r"^b: "):
        check_weights([1.0, float("nan")], ["a", "b"])


@pytest.fixture(scope="module")
def merged_plain(llama_plain_case: PeftCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("numbers") / "merged"
    assert run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out, "-q")[0] == 0
    return out


# --------------------------------------------------------------------------- 11: names printed raw

def test_printable_escapes_control_characters_only() -> None:
    assert printable("model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert printable("a\nb\x1b[2J\x7f\x85\x9f") == "a\\x0ab\\x1b[2J\\x7f\\x85\\x9f"
    assert printable("\ud800x\udfff") == "\\ud800x\\udfff"
    assert printable("‖ΔW‖ café 模型") == "‖ΔW‖ café 模型"


def test_a_shard_name_with_newlines_is_one_escaped_line(llama_sharded_base_dir: Path, llama_plain_case: PeftCase,
                                                       tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama_sharded_base_dir, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "evil\nError: looks fine\n.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    line = refused("merge", base, llama_plain_case.adapter_dir, "-o", out, "-q", culprit=base, out=out)
    assert "evil\\x0aError: looks fine\\x0a.safetensors" in line


ESC_NAME = "model.layers.0.self_attn.q_proj\x1b]0;pwned\x07\x1b[2J"


def _adapter_with_layer_name(case: PeftCase, tmp_path: Path, name: str) -> Path:
    """A copy of the adapter whose q_proj layer of block 0 is called `name` (written with
    an ASCII-escaped JSON header, so lone surrogates survive)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_dir, adapter)
    header, _, body = _split((adapter / "adapter_model.safetensors").read_bytes())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    renamed = {(f"base_model.model.{name}" + k[len(prefix):] if k.startswith(prefix + ".") else k): v for k, v in header.items()}
    assert renamed != header
    (adapter / "adapter_model.safetensors").write_bytes(_join(renamed, body))
    return adapter


def test_layer_names_reach_no_terminal_raw(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    adapter = _adapter_with_layer_name(llama_plain_case, tmp_path, ESC_NAME)
    code, stdout, stderr = run_cli("inspect", adapter, "--all")
    assert code == 0, stderr
    assert "\x1b" not in stdout and "\x07" not in stdout
    assert "q_proj\\x1b]0;pwned\\x07\\x1b[2J" in stdout
    # the same name in an error: merge cannot place the layer in the base
    out = tmp_path / "out"
    line = refused("merge", llama_plain_case.base_dir, adapter, "-o", out, "-q", culprit=adapter, out=out)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b]0;pwned" in line


def test_a_lone_surrogate_in_a_name_is_one_printable_line(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """Not valid UTF-8 on any stream: refused by the reader, and the line says it escaped."""
    adapter = _adapter_with_layer_name(llama_plain_case, tmp_path, "model.layers.0.self_attn.q_proj\ud800")
    line = refused("inspect", adapter, culprit=adapter, says=("surrogate",))
    line.encode("utf-8")  # printable, not a lone surrogate
    assert "\\ud800" in line


def test_internal_error_line_is_escaped(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from lora_tools import cli

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("bad \x1b[2J name")

    monkeypatch.setattr(cli.cli, "invoke", boom)
    monkeypatch.setattr(sys, "argv", ["lora-tools", "inspect", "x"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == cli.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "\x1b" not in err and "bad \\x1b[2J name" in err and len(err.splitlines()) == 1
