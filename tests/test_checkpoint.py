"""BaseCheckpoint: single files, sharded folders (hand-made and from transformers), every
layout error named with its file, and raw byte copies of untouched tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_tools.io import output_file as filesink
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.errors import FormatError, LoraToolsError, MismatchError
from lora_tools.io.stream_writer import SafetensorsStreamWriter, file_layout
from lora_tools.io.safetensors_file import SafetensorsFile


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=gen).to(torch.bfloat16),
        "model.layers.0.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.layers.0.q_proj.bias": torch.randn(8, generator=gen),
        "model.layers.1.q_proj.weight": torch.randn(8, 8, generator=gen).half(),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": torch.randn(16, 8, generator=gen),
    }


@pytest.fixture
def single_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    return path


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Two shards plus an index, as transformers lays them out, and some non-weight files."""
    folder.mkdir()
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for k, part in enumerate((names[:3], names[3:]), start=1):
        shard = f"model-0000{k}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "training_args.bin").write_bytes(b"not weights")
    (folder / "pytorch_model.bin").write_bytes(b"stale weights")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}")
    (folder / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.metadata").write_text("download state")
    return weight_map


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    _write_sharded(tmp_path / "model", _tensors())
    return tmp_path / "model"


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real tiny Llama saved by transformers with real sharding (3 shards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_single_file(single_file: Path) -> None:
    expected = _tensors()
    with BaseCheckpoint.open(single_file) as ckpt:
        assert not ckpt.is_dir
        assert ckpt.shard_names == ["base.safetensors"]
        assert ckpt.weight_map == dict.fromkeys(expected, "base.safetensors")
        assert sorted(ckpt.tensor_names()) == sorted(expected)
        assert ckpt.extra_files() == []
        assert ckpt.index_metadata == {}
        for name, tensor in expected.items():
            assert torch.equal(ckpt.torch(name), tensor)
            assert ckpt.info(name).shape == tuple(tensor.shape)
        assert np.array_equal(ckpt.numpy("model.embed.weight"), expected["model.embed.weight"].float().numpy())
        assert ckpt.module_paths() == {
            "model.embed", "model.layers.0.q_proj", "model.layers.1.q_proj", "model.norm", "lm_head",
        }
        assert ckpt.has("lm_head.weight") and not ckpt.has("lm_head.bias")
        with pytest.raises(MismatchError, match=r"has no tensor 'nope'"):
            ckpt.info("nope")


def test_folder_with_model_safetensors(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    save_file(_tensors(), tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text("{}")
    with BaseCheckpoint.open(tmp_path / "m") as ckpt:
        assert ckpt.is_dir and ckpt.shard_names == ["model.safetensors"]
        assert set(ckpt.weight_map.values()) == {"model.safetensors"}
        assert ckpt.extra_files() == [Path("config.json")]


def test_sharded_folder(sharded: Path) -> None:
    expected = _tensors()
    with BaseCheckpoint.open(sharded) as ckpt:
        assert ckpt.is_dir
        assert ckpt.shard_names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert ckpt.index_metadata == {"total_size": 123}
        assert sorted(ckpt.tensor_names()) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(ckpt.torch(name), tensor)
        assert ckpt.shard(ckpt.shard_names[0]) is ckpt.shard(ckpt.shard_names[0])  # cached
        # weights of other formats (stale, unmerged) and the download state are not extras
        assert ckpt.extra_files() == [
            Path("config.json"), Path("original/params.json"), Path("tokenizer.json"), Path("training_args.bin"),
        ]


def test_tensor_names_are_in_storage_order(sharded: Path) -> None:
    with BaseCheckpoint.open(sharded) as ckpt:
        names = ckpt.tensor_names()
        for shard_name in ckpt.shard_names:
            starts = [ckpt.info(n).start for n in names if ckpt.weight_map[n] == shard_name]
            assert starts == sorted(starts)


def test_transformers_sharded_model(hf_tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, state = hf_tiny
    with BaseCheckpoint.open(folder) as ckpt:
        assert len(ckpt.shard_names) >= 2
        assert ckpt.shard_names == sorted(ckpt.shard_names)
        assert set(ckpt.tensor_names()) == set(state)
        for name, tensor in state.items():
            assert torch.equal(ckpt.torch(name), tensor), name
        assert "model.layers.1.self_attn.q_proj" in ckpt.module_paths()
        assert ckpt.index_metadata["total_size"] == sum(t.nbytes for t in state.values())
        assert Path("config.json") in ckpt.extra_files()
        assert not any(p.suffix == ".safetensors" or p.name.endswith("index.json") for p in ckpt.extra_files())


def test_transformers_shards_copy_byte_for_byte(
    hf_tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Streaming each shard in its own layout reproduces transformers' files exactly."""
    folder, _ = hf_tiny
    with BaseCheckpoint.open(folder) as ckpt:
        for shard_name in ckpt.shard_names:
            src = ckpt.shard(shard_name)
            with SafetensorsStreamWriter(tmp_path / shard_name, file_layout(src), src.metadata) as writer:
                for name, _, _ in file_layout(src):
                    writer.copy_tensor(name, src)
            assert (tmp_path / shard_name).read_bytes() == (folder / shard_name).read_bytes()


# -- errors: each is a LoraToolsError whose message starts with the file at fault -------

def _expect_error(path: Path, blamed: Path, match: str) -> None:
    with pytest.raises(LoraToolsError) as caught:
        BaseCheckpoint.open(path)
    assert str(caught.value).startswith(f"{blamed}: "), str(caught.value)
    assert caught.value.path == str(blamed)
    assert match in str(caught.value), str(caught.value)


def test_missing_path(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope", tmp_path / "nope", "no such file or folder")


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    _expect_error(tmp_path, tmp_path, "no model.safetensors or model.safetensors.index.json")


def test_adapter_folder_given_as_base(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    _expect_error(tmp_path, tmp_path, "this is a PEFT adapter")


def test_pytorch_bin_only(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    _expect_error(tmp_path, tmp_path, "only .safetensors checkpoints are supported; convert with")
    _expect_error(tmp_path / "pytorch_model.bin", tmp_path / "pytorch_model.bin", "only .safetensors")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", 'has no "weight_map"'),
        ('{"metadata": {}}', 'has no "weight_map"'),
        ('{"weight_map": {}}', 'has no "weight_map"'),
        ('{"weight_map": {"a": 3}}', "bad shard file name 3"),
        ('{"weight_map": {"a": "../evil.safetensors"}}', "bad shard file name"),
        ('{"weight_map": {"a": "s.safetensors"}, "metadata": 5}', '"metadata" is not a JSON object'),
    ],
)
def test_bad_index(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(text)
    _expect_error(tmp_path, tmp_path / "model.safetensors.index.json", match)


def test_index_names_missing_shard(sharded: Path) -> None:
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    _expect_error(sharded, shard, "missing, but model.safetensors.index.json lists tensors in it")


def test_index_lists_tensor_absent_from_shard(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect_error(sharded, sharded / "model-00001-of-00002.safetensors", "has no tensor 'ghost.weight'")


def test_shard_holds_tensor_missing_from_index(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    _expect_error(sharded, sharded / shard, f"holds tensor {name!r}, not in model.safetensors.index.json")


def test_shard_holds_tensor_the_index_puts_elsewhere(sharded: Path) -> None:
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(n for n, s in index["weight_map"].items() if s.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    _expect_error(sharded, sharded / "model-00001-of-00002.safetensors", "mapped to 'model-00002")


def test_corrupt_shard_is_named(sharded: Path) -> None:
    shard = sharded / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(FormatError) as caught:
        BaseCheckpoint.open(sharded)
    assert str(caught.value).startswith(f"{shard}: ")


# -- raw copies ------------------------------------------------------------------------

@pytest.fixture(params=["direct", "in_kernel", "buffered"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a copy test through each way the output file copies: an aligned stage for
    direct I/O, copy_file_range, and a small buffer (tiny chunks: many reads)."""
    if request.param != "direct":
        monkeypatch.setattr(filesink, "_set_direct", lambda fd, on: False)
    if request.param == "buffered":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
        monkeypatch.setattr(filesink, "COPY_CHUNK_BYTES", 7)
    elif request.param == "in_kernel" and not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")
    return str(request.param)


def _copy_all(src: SafetensorsFile, dst: Path) -> None:
    with SafetensorsStreamWriter(dst, file_layout(src), src.metadata) as writer:
        for name, _, _ in file_layout(src):
            writer.copy_tensor(name, src)


def test_copy_tensor_reproduces_the_file(single_file: Path, tmp_path: Path, copy_path: str) -> None:
    with SafetensorsFile(single_file) as src:
        _copy_all(src, tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == single_file.read_bytes()


def test_copy_tensor_empty_tensor(tmp_path: Path, copy_path: str) -> None:
    save_file({"e": torch.zeros(0, 3), "f": torch.ones(2)}, tmp_path / "e.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "e.safetensors") as src:
        _copy_all(src, tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "e.safetensors").read_bytes()


def test_copy_tensor_file_truncated_after_open(single_file: Path, tmp_path: Path, copy_path: str) -> None:
    src = SafetensorsFile(single_file)
    last = max(src.tensors.values(), key=lambda i: i.end)
    single_file.write_bytes(single_file.read_bytes()[: last.start + 3])
    with pytest.raises(FormatError) as caught:
        _copy_all(src, tmp_path / "copy.safetensors")
    assert str(caught.value) == f"{single_file}: tensor {last.name!r}: file ended early (truncated?)"
    src.close()


def test_mapped_views_equal_the_stored_values_and_survive_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`SafetensorsFile.mapped` (resize's reading): each tensor's stored values (bf16 as its
    bits) in a read-only view of the mapped file, still readable after `close`; a file
    that is cut short since it was opened is named, and where the file system refuses to
    map, the values are read instead."""
    import mmap

    tensors = {"bf": torch.randn(5, 3).to(torch.bfloat16), "f32": torch.randn(4, 2), "f16": torch.randn(7).half(),
               "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    file = SafetensorsFile(path)
    views = {name: file.mapped(name) for name in tensors}
    file.close()
    for name, value in tensors.items():
        expected = value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()
        assert views[name].dtype == expected.dtype and np.array_equal(views[name], expected), name
        assert not views[name].flags.writeable
    refused = SafetensorsFile(path)
    monkeypatch.setattr(mmap, "mmap", lambda *a, **k: (_ for _ in ()).throw(OSError(19, "No such device")))
    assert np.array_equal(refused.mapped("f32"), tensors["f32"].numpy()) and refused.mapped("f32").flags.writeable
    monkeypatch.undo()
    cut = SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(FormatError, match="truncated"):
        cut.mapped("f32")
