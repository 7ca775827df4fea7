"""Base checkpoints: a Hugging Face model folder (one file or index + shards) or one file.

`BaseCheckpoint.open` validates the whole layout up front (the index, every shard's
header, and that index and shards agree tensor for tensor), so a merge fails before it
has computed or written anything. Tensor data is read only when asked for.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lora_tools.errors import FormatError, MismatchError
from lora_tools.io.safetensors_file import SafetensorsFile, TensorInfo, open_regular

if TYPE_CHECKING:
    from lora_tools.io.fp8_layout import Fp8Layout

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

CONVERT_HINT = (
    "only .safetensors checkpoints are supported; convert with transformers: "
    "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder) "
    "writes model.safetensors"
)

# Files holding (unmerged) weights in some other layout or format. They are not copied
# into a merged folder: a loader that prefers them would silently load the base model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".msgpack.index.json", ".h5.index.json")
_NOT_MODEL_FILES = ("training_args.bin",)  # a .bin that is not weights: keep it
# Folders that describe the source folder itself, not the model (git, huggingface_hub's
# local-dir download state): copying them would make the output claim to be the source.
_SKIPPED_DIRS = (".git", ".cache")


class SupportsWrite(Protocol):
    """Anything with a binary `write`, such as an open file (or the writer's byte counter)."""

    def write(self, data: Any, /) -> int | None: ...


def _is_weight_file(name: str) -> bool:
    if name in _NOT_MODEL_FILES:
        return False
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIXES)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _link_roots(folder: Path) -> list[Path]:
    """Where links in `folder` may point: into the folder itself, and, for a snapshot of
    Hugging Face's cache (`<repo>/snapshots/<rev>/`, files linking to `../../blobs/<hash>`),
    into that repo folder."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    for snapshot in (real, *real.parents):
        if snapshot.parent.name == "snapshots" and (snapshot.parent.parent / "blobs").is_dir():
            roots.append(snapshot.parent.parent)
            break
    return roots


def _is_present(path: Path) -> bool:
    """Something other than a folder is there (a FIFO too: it is then refused, not skipped)."""
    return path.exists() and not path.is_dir()


def read_regular(path: Path) -> bytes:
    """A small file's bytes (an index); a FIFO or device is refused, never opened."""
    with os.fdopen(open_regular(path), "rb") as handle:
        return handle.read()


@dataclass
class BaseCheckpoint:
    """A base model's tensors, spread over one or more safetensors shards.

    `weight_map` maps each tensor to the shard file holding it (for a single file, that
    file's name); `shard_names` lists the shards sorted by file name, which for Hugging
    Face's `model-0000k-of-0000n` names is shard order.
    """

    path: Path
    is_dir: bool
    shard_names: list[str]
    weight_map: dict[str, str]
    index_metadata: dict[str, Any] = field(default_factory=dict)
    _shards: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)
    # FP8 weights and their scales (io.fp8_layout), when the checkpoint holds any.
    fp8: Fp8Layout | None = None

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BaseCheckpoint:
        """Open and validate a model folder or a single .safetensors file, FP8 scales
        included (`fp8`)."""
        from lora_tools.io.fp8_layout import config_path_of, fp8_layout

        checkpoint = cls._open_files(Path(path))
        try:
            checkpoint.fp8 = fp8_layout(
                checkpoint.tensor_names(), checkpoint.info, lambda name: checkpoint.shard_of(name).path,
                config_path_of(checkpoint.path, checkpoint.is_dir),
            )
        except BaseException:
            checkpoint.close()
            raise
        return checkpoint

    @classmethod
    def _open_files(cls, path: Path) -> BaseCheckpoint:
        if not path.exists():
            raise FormatError(path, "no such file or folder")
        if not path.is_dir():
            if path.name.endswith(_WEIGHT_INDEX_SUFFIXES):
                raise FormatError(path, "pass the model folder, not its index file")
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                raise FormatError(path, CONVERT_HINT)
            shard = SafetensorsFile(path)
            weight_map = dict.fromkeys(shard.keys(), path.name)
            return cls(path, False, [path.name], weight_map, {}, {path.name: shard})
        # A FIFO or device under these names is refused by name (never opened), not skipped.
        if _is_present(path / SINGLE_NAME):  # preferred over an index, as transformers does
            shard = SafetensorsFile(path / SINGLE_NAME)
            weight_map = dict.fromkeys(shard.keys(), SINGLE_NAME)
            return cls(path, True, [SINGLE_NAME], weight_map, {}, {SINGLE_NAME: shard})
        if _is_present(path / INDEX_NAME):
            return cls._open_index(path)
        if any(path.glob("pytorch_model*.bin")):
            raise FormatError(path, CONVERT_HINT)
        hint = " (this is a PEFT adapter, not a base model)" if (path / "adapter_config.json").exists() else ""
        raise FormatError(path, f"no {SINGLE_NAME} or {INDEX_NAME} in this folder{hint}")

    @classmethod
    def _open_index(cls, folder: Path) -> BaseCheckpoint:
        index_path = folder / INDEX_NAME
        try:
            index = json.loads(read_regular(index_path).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, 5000-digit ints
            raise FormatError(index_path, f"not valid JSON ({exc})") from None
        except RecursionError:  # "[[[[…" a hundred thousand deep
            raise FormatError(index_path, "not valid JSON (nested too deeply)") from None
        except OSError as exc:
            raise FormatError(index_path, f"cannot read: {exc.strerror or exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(index_path, 'has no "weight_map" mapping tensor names to shard files')
        metadata = index.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise FormatError(index_path, '"metadata" is not a JSON object')
        for tensor, shard_name in weight_map.items():
            # A shard must be a plain file name: the merge writes shards under the same
            # names, and "../x" would write outside the output folder.
            if (
                not isinstance(shard_name, str)
                or shard_name in ("", ".", "..")
                or "/" in shard_name
                or "\\" in shard_name
            ):
                raise FormatError(index_path, f"tensor {tensor!r}: bad shard file name {shard_name!r}")

        checkpoint = cls(folder, True, sorted(set(weight_map.values())), dict(weight_map), metadata)
        for shard_name in checkpoint.shard_names:
            shard_path = folder / shard_name
            if not (shard_path.exists() or shard_path.is_symlink()):
                raise FormatError(shard_path, f"missing, but {INDEX_NAME} lists tensors in it")
            checkpoint._shards[shard_name] = shard = SafetensorsFile(shard_path)
            for tensor in shard.tensors:
                listed = weight_map.get(tensor)
                if listed != shard_name:
                    where = "not in" if listed is None else f"mapped to {listed!r} by"
                    raise FormatError(shard_path, f"holds tensor {tensor!r}, {where} {INDEX_NAME}")
        for tensor, shard_name in weight_map.items():
            if tensor not in checkpoint._shards[shard_name]:
                raise FormatError(folder / shard_name, f"has no tensor {tensor!r}, which {INDEX_NAME} lists in it")
        return checkpoint

    # -- tensors ------------------------------------------------------------------------
    def shard(self, name: str) -> SafetensorsFile:
        """The opened shard `name` (headers are read once; data only on demand)."""
        if name not in self._shards:
            if name not in self.shard_names:
                raise MismatchError(self.path, f"has no shard {name!r}")
            self._shards[name] = SafetensorsFile(self._shard_path(name))
        return self._shards[name]

    def _shard_path(self, name: str) -> Path:
        return self.path / name if self.is_dir else self.path

    def tensor_names(self) -> list[str]:
        """Every tensor, in storage order: shard by shard, by byte offset within a shard."""
        names: list[str] = []
        for shard_name in self.shard_names:
            infos = self.shard(shard_name).tensors.values()
            names += [i.name for i in sorted(infos, key=lambda i: (i.start, i.end))]
        return names

    def has(self, tensor: str) -> bool:
        return tensor in self.weight_map

    def shard_of(self, tensor: str) -> SafetensorsFile:
        """The opened shard holding `tensor` (MismatchError when the base has no such tensor)."""
        try:
            return self.shard(self.weight_map[tensor])
        except KeyError:
            raise MismatchError(self.path, f"has no tensor {tensor!r}") from None

    def info(self, tensor: str) -> TensorInfo:
        return self.shard_of(tensor).info(tensor)

    def numpy(self, tensor: str) -> np.ndarray:
        """The tensor's values as numpy (bf16 widened exactly to float32, an FP8 weight
        dequantized to float32)."""
        if self.is_fp8_weight(tensor):
            return np.asarray(self.torch(tensor).numpy())
        return self.shard_of(tensor).numpy(tensor)

    def torch(self, tensor: str) -> Any:
        """The tensor's values as a CPU torch tensor in its stored dtype (an FP8 weight:
        dequantized, float32)."""
        stored = self.shard_of(tensor).torch(tensor)
        return self.dequantized(tensor, stored) if self.is_fp8_weight(tensor) else stored

    # -- FP8 weights --------------------------------------------------------------------
    def is_fp8_weight(self, tensor: str) -> bool:
        return self.fp8 is not None and tensor in self.fp8.weights

    def value_dtype(self, tensor: str) -> str:
        """The dtype code of the values a reader sees: F32 for a dequantized FP8 weight."""
        return "F32" if self.is_fp8_weight(tensor) else self.info(tensor).dtype

    def scales_of(self, tensor: str) -> tuple[Any, tuple[int, int]]:
        """An FP8 weight's scale tensor (read, CPU) and block."""
        assert self.fp8 is not None
        scaled = self.fp8.weights[tensor]
        return self.shard_of(scaled.scale).torch(scaled.scale), scaled.block

    def row_dequantizer(self, tensor: str, stored: Any) -> Any:
        """`io.fp8.RowDequantizer` of an FP8 weight's stored codes (on any device)."""
        from lora_tools.io.fp8 import RowDequantizer

        return RowDequantizer(stored, *self.scales_of(tensor))

    def dequantized(self, tensor: str, stored: Any, out: Any = None) -> Any:
        """An FP8 weight's stored codes (`stored`, on any device) times its scales: float32
        on the same device (in `out` when given)."""
        from lora_tools.io.fp8 import dequantize

        return dequantize(stored, *self.scales_of(tensor), out)

    def module_paths(self) -> set[str]:
        """Module paths that have a weight: `x.y.weight` gives `x.y`."""
        return {name[: -len(".weight")] for name in self.weight_map if name.endswith(".weight")}

    def extra_files(self) -> list[Path]:
        """Files to copy into a merged folder, relative to it, recursively, sorted.

        Everything except weights: the shards and index in use, weight files of other
        layouts or formats (pytorch_model*.bin, consolidated.safetensors, ...: they would
        hold unmerged weights), .git and .cache, and our own leftover temporaries.
        A single-file checkpoint has none. Symlinked folders are walked like the others
        (so the weight filter applies inside them too) and only regular files are listed.
        FormatError for a link that points outside the folder (see `_link_roots`), a link
        loop, or a FIFO, device or socket: copying them would leak other files into the
        output, never end, or block.
        """
        if not self.is_dir:
            return []
        extras: list[Path] = []
        _walk_extras(self.path, Path(), [Path(os.path.realpath(self.path))], _link_roots(self.path), extras)
        return sorted(extras)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _walk_extras(folder: Path, rel: Path, chain: list[Path], roots: list[Path], extras: list[Path]) -> None:
    """Add the extra files under `folder` (at `rel` in the output) to `extras`.

    `chain` holds the real paths of the folders walked into to get here: a link to any
    of them, or to a folder holding one, is a loop (os.walk would go around it ~40 times).
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise FormatError(folder, f"cannot read: {exc.strerror or exc}") from None
    for entry in entries:
        name, path = entry.name, folder / entry.name
        if ".lora-tools-" in name or (name in _SKIPPED_DIRS and entry.is_dir()):
            continue
        if _is_weight_file(name) and not entry.is_dir():
            continue  # never copied, so never opened: weights may live anywhere
        if entry.is_symlink():
            _check_link(path, roots)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise FormatError(path, f"cannot read: {exc.strerror or exc}") from None
        if stat.S_ISDIR(mode):
            real = Path(os.path.realpath(path))
            if any(_inside(walked, real) for walked in chain):
                raise FormatError(path, f"is a symlink loop: it links to {real}, a folder that contains it")
            _walk_extras(path, rel / name, [*chain, real], roots, extras)
        elif stat.S_ISREG(mode):
            extras.append(rel / name)
        else:
            raise FormatError(path, "not a regular file (a FIFO, device or socket cannot be copied)")


def _check_link(path: Path, roots: list[Path]) -> None:
    """Refuse a link that is broken, loops, or resolves outside every root."""
    try:
        real = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        raise FormatError(path, f"is a broken symlink (to {os.readlink(path)})") from None
    except (OSError, RuntimeError) as exc:  # ELOOP
        raise FormatError(path, f"is a symlink loop ({getattr(exc, 'strerror', None) or exc})") from None
    if not any(_inside(real, root) for root in roots):
        raise FormatError(
            path,
            f"is a symlink to {real}, outside the model folder (refused: only links inside it, "
            "or into a Hugging Face cache's blobs, are followed)",
        )
