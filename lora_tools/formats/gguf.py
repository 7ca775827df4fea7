"""llama.cpp LoRA adapters (GGUF), written from the canonical layers with numpy and the
`gguf` package (llama.cpp's own gguf-py) only: no torch.

What llama.cpp expects, read from its source as vendored by llama-cpp-python 0.3.36
(convert_lora_to_gguf.py, conversion/*.py, src/llama-adapter.{h,cpp}, src/llama-graph.cpp)
and from gguf 0.19.0:

- KV. `general.architecture` (the base's GGUF arch; llama-adapter.cpp
  `llama_adapter_lora_init_impl` throws on a mismatch with the model), `general.type` =
  "adapter" and `adapter.type` = "lora" (both required there), `adapter.lora.alpha` (f32;
  read as 0 when absent). convert_lora_to_gguf.py `LoraModel.set_type` /
  `set_gguf_parameters` write these; `ModelBase.prepare_metadata` (conversion/base.py)
  adds `general.quantization_version` = 2 and model-card fields (`general.name`...),
  which callers may pass as `metadata`.
- Scale. One alpha per file: `llama_adapter_lora_weight::get_scale` (llama-adapter.h)
  gives user_scale·alpha/r with r = lora_b.ne[0] (the tensor's rank), or user_scale
  when alpha is 0; `build_lora_mm` (llama-graph.cpp) adds scale·B·(A·x). The converter
  writes the config's `lora_alpha` and ignores rsLoRA and alpha/rank patterns; we
  choose alpha and fold what remains into the factors so every layer keeps s·B·A.
- Tensors. `<base GGUF name>.lora_a` / `.lora_b`, e.g. "blk.0.attn_q.weight.lora_a";
  the base name is the converter's `map_tensor_name` (conversion/base.py): gguf's
  `get_tensor_name_map(arch, num_hidden_layers).get_name(hf_name + ".weight",
  try_suffixes=(".weight", ".bias"))`. numpy a (r, in), b (out, r); gguf writes dims
  reversed, so ne a = [in, r], b = [r, out], and llama-adapter.cpp checks
  model.ne[0] == a.ne[0], model.ne[1] == b.ne[1], a.ne[1] == b.ne[0].
- token_embd. PEFT's lora_embedding_A (r, vocab) is written transposed, (vocab, r),
  lora_b (dim, r) as is (convert_lora_to_gguf.py `modify_tensors`): `build_inp_embd`
  takes rows of lora_a per token, and llama-adapter.cpp checks model.ne[0] == b.ne[1],
  model.ne[1] == a.ne[1] for names ending "token_embd.weight" only.
- RoPE. For llama-family bases, conversion/llama.py `LlamaModel.modify_tensors` permutes
  the rows of q_proj (n_head) and k_proj (n_kv_head) with `LlamaModel.permute`
  (HF's half-split rotary layout to llama.cpp's interleaved one). ΔW = B·A, so the rows
  of B get the same permutation (the converter's `LoraTorchTensor.permute`). Qwen2 and
  Qwen3 (conversion/qwen.py) do not permute. HF MistralForCausalLM is registered to
  LlamaModel (permutes); `MistralModel.undo_permute = False` is for the consolidated
  (non-HF) format only.
- lm_head maps to output.weight; a base with tied embeddings has no output.weight in its
  GGUF, and llama.cpp refuses a LoRA on it (the converter's lm_head check, llama.cpp#9065).
- The converter exits on DoRA magnitudes and LoRA biases ("Unexpected name").
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_tools.adapter import LoraLayer
from lora_tools.errors import FormatError
from lora_tools.io.encode import WriteError, bf16_to_float32, encode_array

__all__ = [
    "GGUF_INSTALL_HINT", "SUPPORTED_ARCHITECTURES", "GgufWritten", "gguf_available", "read_gguf_adapter",
    "rope_permutation", "write_gguf_adapter",
]

GGUF_INSTALL_HINT = "pip install 'lora-tools[gguf]'"

# HF architecture -> (gguf.MODEL_ARCH member, q/k rows permuted), from the classes that
# `ModelBase.register`s them in llama.cpp's conversion/ package (llama.py, qwen.py).
# Add one only after reading its class's modify_tensors for reshapes of LoRA'd weights.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}
# config.json without "architectures" (the converter needs it; transformers' AutoModelForCausalLM does not).
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_KV_WRITTEN = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
               "general.quantization_version")
_TOKEN_EMBD = "token_embd.weight"


@dataclass
class GgufWritten:
    """What `write_gguf_adapter` wrote."""

    architecture: str  # GGUF arch name written, e.g. "llama", "qwen2"
    alpha: float  # adapter.lora.alpha written (a float32 value)
    names: dict[str, str]  # layer name (HF module path) -> GGUF base tensor name, e.g. "blk.0.attn_q.weight"
    folded: dict[str, float]  # layer -> factor its B was multiplied by (only where != 1)


def gguf_available() -> bool:
    """Whether the `gguf` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("gguf") is not None


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of `LlamaModel.permute`: new[i] = old[perm[i]]. Per head, HF keeps the
    two rotary halves apart (j, j + d/2); llama.cpp wants them interleaved (2j, 2j+1)."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def write_gguf_adapter(
    layers: Sequence[LoraLayer],
    path: str | os.PathLike[str],
    *,
    base_config: Mapping[str, Any],
    dtype: str = "F32",
    metadata: Mapping[str, str] | None = None,
) -> GgufWritten:
    """Write `layers` (named by the base's module paths) as a llama.cpp LoRA adapter for the
    base whose config.json is `base_config`. `path` must not exist. Everything is checked
    and encoded before the file is created, so a refusal leaves nothing behind.

    llama.cpp applies alpha/r_l to every layer: alpha is the most common s_l·r_l, and a
    layer whose s_l·r_l differs has f = s_l·r_l/alpha folded into B (in float64, then one
    rounding to `dtype`; BF16 through float32, as torch and io.encode round). All of f goes
    to B: A stays bit-exact, and a power-of-two f (alpha patterns are usually ratios of
    powers of two) is exact in any dtype.
    """
    import gguf

    if dtype not in ("F32", "F16", "BF16"):
        raise WriteError(f"cannot write GGUF factors as {dtype!r} (use F32, F16 or BF16)")
    if not layers:
        raise WriteError("no layers to write")
    if os.path.lexists(path):
        raise WriteError(f"{os.fspath(path)}: already exists")
    extra = dict(metadata or {})
    if taken := sorted(set(extra) & set(_KV_WRITTEN)):
        raise WriteError(f"metadata may not set {', '.join(taken)}: the writer sets it")
    arch_name, tensor_map, heads = _base_arch(base_config, gguf)
    tied = bool(base_config.get("tie_word_embeddings", False))  # False: transformers' default for these four
    names: dict[str, str] = {}
    for layer in layers:
        names[layer.name] = _base_tensor_name(layer, tensor_map, tied, names)
    alpha, folded = _shared_alpha(layers)
    ggml_type = getattr(gguf.GGMLQuantizationType, dtype)
    tensors: list[tuple[str, np.ndarray]] = []
    for layer in layers:
        a = np.asarray(layer.a)  # (r, in)
        b = np.asarray(layer.b)  # (out, r)
        if layer.name in folded:
            b = b.astype(np.float64) * folded[layer.name]
        base = names[layer.name]
        for suffix, n_head in heads.items():  # llama-family q/k: the base's rows were permuted
            if (layer.name + ".weight").endswith(suffix):
                try:
                    b = b[rope_permutation(b.shape[0], n_head)]
                except ValueError as error:
                    raise WriteError(f"layer {layer.name!r}: {error}") from None
        if base == _TOKEN_EMBD:
            a = a.T  # (vocab, r): build_inp_embd takes its rows by token id
        tensors.append((f"{base}.lora_a", encode_array(a, dtype, f"{base}.lora_a")))
        tensors.append((f"{base}.lora_b", encode_array(b, dtype, f"{base}.lora_b")))
    writer = gguf.GGUFWriter(path, arch_name)  # adds general.architecture; opens nothing yet
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_uint32("general.quantization_version", 2)  # gguf.GGML_QUANT_VERSION, as the converter writes
    for key, value in extra.items():
        writer.add_string(key, value)
    for name, data in tensors:
        writer.add_tensor(name, data, raw_dtype=ggml_type)  # BF16 arrives as uint16 bits
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        if os.path.lexists(path):
            os.remove(path)
        raise
    writer.close()
    return GgufWritten(arch_name, alpha, names, folded)


def read_gguf_adapter(
    path: str | os.PathLike[str], modules: Sequence[str], *, base_config: Mapping[str, Any]
) -> dict[str, LoraLayer]:
    """Read back a llama.cpp LoRA adapter for the base `base_config` describes, as layers
    named by `modules` (those absent from the file are left out), undoing the writer's
    layout: q/k rows un-permuted, token_embd's lora_a transposed back. Each layer's alpha
    is the file's, so its scale is llama.cpp's alpha/r. For proving a written file."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        kv = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (OSError, ValueError) as error:
        raise FormatError(path, f"is not a readable GGUF file ({error})") from None
    try:
        arch_name, tensor_map, heads = _base_arch(base_config, gguf)
    except WriteError as error:
        raise FormatError(path, str(error)) from None
    found = (kv.get("general.type"), kv.get("adapter.type"), kv.get("general.architecture"))
    if found != ("adapter", "lora", arch_name) or not isinstance(kv.get("adapter.lora.alpha"), float):
        raise FormatError(path, f"is no llama.cpp LoRA adapter for a {arch_name} base "
                                f"(general.type, adapter.type, general.architecture: {found})")
    tensors = {t.name: t for t in reader.tensors}
    layers: dict[str, LoraLayer] = {}
    for module in modules:
        base = tensor_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if f"{base}.lora_a" not in tensors or f"{base}.lora_b" not in tensors:
            continue
        try:
            (a, dtype), (b, _) = (_stored_values(tensors[f"{base}.{ab}"]) for ab in ("lora_a", "lora_b"))
            for suffix, n_head in heads.items():
                if (module + ".weight").endswith(suffix):
                    b = b[np.argsort(rope_permutation(b.shape[0], n_head))]
        except ValueError as error:
            raise FormatError(path, f"{base}: {error}") from None
        if base == _TOKEN_EMBD:
            a = a.T  # back to PEFT's lora_embedding_A (r, vocab)
        layers[module] = LoraLayer(module, a, b, kv["adapter.lora.alpha"], dtype=dtype,
                                   kind="embedding" if base == _TOKEN_EMBD else "linear")
    return layers


def _stored_values(tensor: Any) -> tuple[np.ndarray, str]:
    """(values in numpy order, as float32 unless F64, bf16 and fp16 widened exactly; dtype code)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    code = tensor.tensor_type.name
    if code == "BF16":
        bits = np.ascontiguousarray(tensor.data).view("<u2").reshape(shape)
        return bf16_to_float32(bits), code
    if code not in ("F32", "F16", "F64"):
        raise ValueError(f"{tensor.name}: unexpected tensor type {code}")
    return np.asarray(tensor.data).reshape(shape).astype(np.float64 if code == "F64" else np.float32), code


def _base_arch(config: Mapping[str, Any], gguf: Any) -> tuple[str, Any, dict[str, int]]:
    """(GGUF arch name, the converter's tensor name map, {q/k suffix: heads} to permute)."""
    archs = config.get("architectures") or [_BY_MODEL_TYPE.get(str(config.get("model_type")), config.get("model_type"))]
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise WriteError(f"base architecture {hf_arch!r} has no GGUF adapter support here "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    member, permute = SUPPORTED_ARCHITECTURES[hf_arch]
    arch = getattr(gguf.MODEL_ARCH, member, None)
    n_blocks = config.get("num_hidden_layers")
    if arch is None:
        raise WriteError(f"base architecture {hf_arch!r} needs a newer gguf package ({GGUF_INSTALL_HINT} -U)")
    if not isinstance(n_blocks, int):
        raise WriteError("base config has no num_hidden_layers")
    heads: dict[str, int] = {}
    if permute:  # LlamaModel.modify_tensors; transformers' LlamaConfig defaults kv heads to heads
        n_head = config.get("num_attention_heads")
        n_kv = config.get("num_key_value_heads") or n_head
        if not isinstance(n_head, int) or not isinstance(n_kv, int):
            raise WriteError("base config has no num_attention_heads (needed for the q/k RoPE permutation)")
        heads = {"q_proj.weight": n_head, "k_proj.weight": n_kv}
    return str(gguf.MODEL_ARCH_NAMES[arch]), gguf.get_tensor_name_map(arch, n_blocks), heads


def _base_tensor_name(layer: LoraLayer, tensor_map: Any, tied: bool, taken: Mapping[str, str]) -> str:
    """The GGUF name of the base tensor `layer` updates, or WriteError for what llama.cpp cannot load."""
    where = f"layer {layer.name!r}"
    if layer.magnitude is not None:
        raise WriteError(f"{where}: DoRA (magnitude vector) has no llama.cpp adapter form")
    if layer.bias is not None:
        raise WriteError(f"{where}: llama.cpp LoRA adapters hold no LoRA bias")
    if layer.kind == "conv":
        raise WriteError(f"{where}: llama.cpp LoRA adapters hold no conv layers")
    if layer.rank == 0 or not math.isfinite(layer.scale * layer.rank):
        raise WriteError(f"{where}: rank {layer.rank}, scale {layer.scale}: nothing llama.cpp can apply")
    base = tensor_map.get_name(layer.name + ".weight", try_suffixes=(".weight",))
    if base is None:
        raise WriteError(f"{where}: no GGUF tensor name for this module in the base's architecture")
    if (layer.kind == "embedding") != (base == _TOKEN_EMBD):
        raise WriteError(f"{where}: a {layer.kind} LoRA on {base}: llama.cpp takes embedding LoRAs on token_embd only")
    if base == "output.weight" and tied:
        raise WriteError(f"{where}: lm_head is tied to the embeddings in this base; its GGUF has no output.weight")
    if base in taken.values():
        raise WriteError(f"{where}: GGUF tensor {base} is updated by another layer too")
    return str(base)


def _shared_alpha(layers: Sequence[LoraLayer]) -> tuple[float, dict[str, float]]:
    """(alpha as float32, {layer: f}) with f = s·r/alpha for each layer whose s·r differs.

    Compared as float32, the precision llama.cpp keeps alpha in: an rsLoRA alpha·√r is
    written rounded, like the scale llama.cpp would compute from it anyway.
    """
    alpha_r = {layer.name: layer.scale * layer.rank for layer in layers}  # float64 s·r
    counts = Counter(float(np.float32(v)) for v in alpha_r.values() if v != 0)
    alpha = counts.most_common(1)[0][0] if counts else 1.0  # alpha 0 would mean scale 1 to llama.cpp
    folded = {name: v / alpha for name, v in alpha_r.items() if float(np.float32(v)) != alpha}
    return alpha, folded
