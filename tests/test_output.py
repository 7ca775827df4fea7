"""The streaming writer (round trips through safetensors' own readers, byte equality with
its own writer, protocol checks) and atomic_output (nothing at OUT unless complete)."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_tools.io.atomic import OLD_MARKER, TMP_MARKER, atomic_output, wrap_write_errors
from lora_tools.io.extra_files import copy_extra_files
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.errors import LoraToolsError, Terminated, RequestError
from lora_tools.io.stream_writer import SafetensorsStreamWriter, StreamWriterError, build_header, file_layout, safetensors_order
from lora_tools.io.safetensors_file import SafetensorsFile
from lora_tools.io.dtypes import safetensors_code


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w.bf16": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
        "b.fp16": torch.randn(7, generator=gen).half(),
        "a.fp32": torch.randn(2, 3, generator=gen),
        "z.fp64": torch.randn(3, generator=gen).double(),
        "i.int8": torch.randint(-100, 100, (3,), generator=gen, dtype=torch.int8),
        "n.int64": torch.randint(0, 1000, (2, 2), generator=gen),
        "m.bool": torch.tensor([True, False, True]),
        "e.empty_bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "e.empty_fp32": torch.empty(0),
        "s.scalar": torch.tensor(1.5),
        "ünïcode\n\"name\"": torch.ones(1),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name


def _write_torch(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    entries = [(n, safetensors_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsStreamWriter(path, entries, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write_torch(name, tensor)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_header_matches_safetensors_writer(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    """Entries in safetensors' own order give the file safetensors writes, byte for byte."""
    tensors = _mixed()
    save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
    entries = [(n, safetensors_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    random.Random(0).shuffle(entries)
    ordered = safetensors_order(entries)
    assert [n for n, _, _ in ordered] == [n for n, _, _ in file_layout(SafetensorsFile(tmp_path / "ref.safetensors"))]
    ordered_tensors = {n: tensors[n] for n, _, _ in ordered}
    _write_torch(tmp_path / "ours.safetensors", ordered_tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_copy_in_source_layout_is_byte_identical(tmp_path: Path) -> None:
    """A copy in the source's layout reproduces it, including multi-key metadata (whose
    order safetensors leaves to a Rust HashMap, so only the source's own order matches)."""
    metadata = {f"key{k}": f"value {k}" for k in range(6)}
    save_file(_mixed(1), tmp_path / "ref.safetensors", metadata=metadata)
    src = SafetensorsFile(tmp_path / "ref.safetensors")
    with SafetensorsStreamWriter(tmp_path / "copy.safetensors", file_layout(src), src.metadata) as writer:
        for name, _, _ in file_layout(src):
            writer.copy_tensor(name, src)
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_round_trip_through_safetensors_readers(tmp_path: Path, order: str) -> None:
    """Any entry order loads (key order in the JSON and alignment do not matter to readers)."""
    tensors = _mixed(2)
    if order == "reversed":
        tensors = dict(reversed(tensors.items()))
    metadata = {"format": "pt", "b": "2", "a": "1"}
    path = tmp_path / "out.safetensors"
    _write_torch(path, tensors, metadata)
    _assert_same(load_file(path), tensors)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == metadata
        assert set(handle.keys()) == set(tensors)
        assert torch.equal(_bits(handle.get_tensor("w.bf16")), _bits(tensors["w.bf16"]))
    reread = SafetensorsFile(path)
    assert reread.metadata == metadata
    assert [n for n, _, _ in file_layout(reread)][:1] == [next(iter(tensors))]


_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.int64, torch.bool]


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8),
            st.sampled_from(_DTYPES),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=6,
        unique_by=lambda e: e[0],
    ),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
)
def test_round_trip_property(specs: list, metadata: dict[str, str] | None) -> None:
    import tempfile

    tensors = {name: (torch.rand(shape) * 100).to(dtype) for name, dtype, shape in specs if name != "__metadata__"}
    with tempfile.TemporaryDirectory() as tmp:  # hypothesis reruns the body: no tmp_path
        path = Path(tmp) / "p.safetensors"
        _write_torch(path, tensors, metadata)
        _assert_same(load_file(path), tensors)
        with safe_open(path, framework="pt") as handle:
            assert (handle.metadata() or {}) == (metadata or {})


def test_streaming_writes(tmp_path: Path) -> None:
    data = torch.arange(100, dtype=torch.float32)
    raw = _bits(data).numpy().tobytes()
    entries = [("a", "F32", (100,)), ("b", "F32", (10, 10)), ("c", "U8", (0,))]
    with SafetensorsStreamWriter(tmp_path / "s.safetensors", entries) as writer:
        assert writer.next_name == "a"
        writer.write_chunks("a", (raw[i : i + 33] for i in range(0, 400, 33)))
        writer.write_from("b", lambda sink: sink.write(bytearray(raw)))
        writer.write_bytes("c", b"")
        assert writer.next_name is None
    loaded = load_file(tmp_path / "s.safetensors")
    assert torch.equal(loaded["a"], data) and torch.equal(loaded["b"], data.reshape(10, 10))
    assert loaded["c"].shape == (0,)


def test_writer_protocol_errors(tmp_path: Path) -> None:
    entries = [("a", "F32", (2,)), ("b", "BF16", (2,))]
    writer = SafetensorsStreamWriter(tmp_path / "w.safetensors", entries)
    with pytest.raises(StreamWriterError, match="out of order, expected 'a'"):
        writer.write_bytes("b", bytes(4))
    with pytest.raises(StreamWriterError, match="got 7 bytes, expected 8"):
        writer.write_bytes("a", bytes(7))
    with pytest.raises(StreamWriterError, match="more than its 8 bytes"):
        writer.write_chunks("a", [bytes(5), bytes(5)])
    with pytest.raises(StreamWriterError, match="closed or failed"):  # a write broke off
        writer.write_bytes("a", bytes(8))
    writer.abort()
    writer = SafetensorsStreamWriter(tmp_path / "w2.safetensors", entries)
    with pytest.raises(StreamWriterError, match="4 bytes written, expected 8"):
        writer.write_from("a", lambda sink: sink.write(bytes(4)))
    writer.abort()
    writer = SafetensorsStreamWriter(tmp_path / "w3.safetensors", entries)
    writer.write_torch("a", torch.zeros(2))
    with pytest.raises(StreamWriterError, match=r"got F32 \(2,\), expected BF16 \(2,\)"):
        writer.write_torch("b", torch.zeros(2))
    with pytest.raises(StreamWriterError, match="1 tensors unwritten, next 'b'"):
        writer.close()
    with pytest.raises(FileExistsError):  # never clobbers
        SafetensorsStreamWriter(tmp_path / "w3.safetensors", entries)
    with pytest.raises(StreamWriterError, match="reserved or repeated"):
        build_header([("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(StreamWriterError, match="unknown dtype"):
        build_header([("a", "F33", (1,))])


def test_writer_exit_on_exception_does_not_mask_it(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", [("a", "F32", (1,))]):
            raise KeyError("original")


def test_write_torch_non_contiguous(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).T  # (3, 2), a strided view
    _write_torch(tmp_path / "t.safetensors", {"t": t}, None)
    assert torch.equal(load_file(tmp_path / "t.safetensors")["t"], t)


# -- atomic_output ----------------------------------------------------------------------

def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if TMP_MARKER in p.name or OLD_MARKER in p.name]


def test_atomic_file_success(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.safetensors" + TMP_MARKER)
        assert not tmp.exists()
        tmp.write_bytes(b"data")
        assert not out.exists()  # nothing at OUT until the block finished
    assert out.read_bytes() == b"data" and _leftovers(tmp_path) == []


def test_atomic_folder_success(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with atomic_output(out) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_exception_removes_temporary(tmp_path: Path, kind: str, error: type[BaseException]) -> None:
    out = tmp_path / "out"
    with pytest.raises(error):
        with atomic_output(out) as tmp:
            if kind == "folder":
                tmp.mkdir()
                (tmp / "half.safetensors").write_bytes(b"half")
            else:
                tmp.write_bytes(b"half")
            raise error()
    assert not out.exists() and _leftovers(tmp_path) == []


def test_atomic_refuses_existing_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("old")
    ran = False
    with pytest.raises(RequestError) as caught:
        with atomic_output(out, force=False):
            ran = True
    assert not ran
    assert str(caught.value) == f"{out}: already exists (use --force to replace it)"
    assert out.read_text() == "old"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_force_replaces_only_after_success(tmp_path: Path, kind: str) -> None:
    # what --force may replace (issue #12): a .safetensors file, a folder of what lora-tools writes
    out = tmp_path / ("out" if kind == "folder" else "out.safetensors")

    def fill(path: Path, text: str) -> None:
        if kind == "folder":
            path.mkdir()
            (path / "config.json").write_text(text)
        else:
            path.write_text(text)

    def read() -> str:
        return (out / "config.json").read_text() if kind == "folder" else out.read_text()

    fill(out, "old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, force=True) as tmp:
            fill(tmp, "new")
            assert read() == "old"
            raise RuntimeError("merge failed")
    assert read() == "old" and _leftovers(tmp_path) == []
    with atomic_output(out, force=True) as tmp:
        fill(tmp, "new")
        assert read() == "old"
    assert read() == "new" and _leftovers(tmp_path) == []


def test_force_replaces_folder_with_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output(out, force=True) as tmp:
        tmp.write_text("file now")
    assert out.read_text() == "file now" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("out_rel", ["base", "base/merged", "base/sub/merged.safetensors", "."])
def test_output_overlapping_input_is_refused(tmp_path: Path, out_rel: str) -> None:
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    out = tmp_path / out_rel
    with pytest.raises(RequestError) as caught:
        with atomic_output(out, force=True, inputs=[base]):
            pass
    assert str(caught.value).startswith(f"{out}: output overlaps the input {base}")
    assert base.is_dir()


def test_missing_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="does not exist"):
        with atomic_output(tmp_path / "no" / "out"):
            pass


def test_sigterm_removes_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as caught:
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    assert caught.value.code == 143
    assert not out.exists() and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_write_error_becomes_lora_tools_error(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraToolsError) as caught:
        with wrap_write_errors(out), atomic_output(out) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == f"{out}: cannot write: {os.strerror(errno.ENOSPC)}"
    assert not out.exists() and _leftovers(tmp_path) == []


def test_copy_extra_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "original").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "original" / "params.json").write_text("{}")
    (tmp_path / "blob").write_bytes(b"tokenizer bytes")
    (src / "tokenizer.model").symlink_to(tmp_path / "blob")  # as in a huggingface cache snapshot
    os.utime(src / "config.json", (1_000_000, 1_000_000))
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_extra_files(src, [Path("config.json"), "original/params.json", "tokenizer.model"], dst)
    assert (dst / "config.json").read_text() == '{"a": 1}'
    assert (dst / "config.json").stat().st_mtime == 1_000_000
    assert (dst / "original" / "params.json").read_text() == "{}"
    assert not (dst / "tokenizer.model").is_symlink()
    assert (dst / "tokenizer.model").read_bytes() == b"tokenizer bytes"


def test_sharded_copy_end_to_end(tmp_path: Path) -> None:
    """The path a merge takes, with no adapter: the output folder equals the input."""
    base = tmp_path / "base"
    base.mkdir()
    gen = torch.Generator().manual_seed(3)
    weight_map = {}
    for k, names in enumerate((["x.weight", "y.weight"], ["z.weight"]), start=1):
        shard = f"model-0000{k}-of-00002.safetensors"
        save_file({n: torch.randn(4, 4, generator=gen).half() for n in names}, base / shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    out = tmp_path / "merged"
    with BaseCheckpoint.open(base) as ckpt, wrap_write_errors(out), atomic_output(out, inputs=[base]) as tmp:
        tmp.mkdir()
        for shard_name in ckpt.shard_names:
            src = ckpt.shard(shard_name)
            with SafetensorsStreamWriter(tmp / shard_name, file_layout(src), src.metadata) as writer:
                for name, _, _ in file_layout(src):
                    writer.copy_tensor(name, src)
        copy_extra_files(base, [*ckpt.extra_files(), "model.safetensors.index.json"], tmp)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    for path in base.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
