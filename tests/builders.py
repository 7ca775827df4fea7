"""Tiny, seeded, offline test fixtures: base models, adapters, and broken files.

Everything here is built in-process from small configs (nothing is downloaded) and
written under a caller-given root. Every builder is deterministic (fixed seeds, global
torch RNG state restored afterwards) and idempotent (a folder that already holds its
result is reused). Nothing here imports lora_tools: these files are the independent
reference the library is tested against. Treat what they build as read-only.

Bases (`build_base(kind, root)`, Hugging Face folders: config.json + safetensors)
  llama          LlamaForCausalLM: hidden 64, 2 layers, intermediate 128, 4 heads,
                 2 kv heads (k/v_proj are 32×64), vocab 96, untied lm_head, fp32
  llama_bias     the same with attention_bias=True and non-zero q/k/v/o biases
  llama_bf16     the llama weights rounded to bfloat16 and saved so
  llama_sharded  the llama tensors, bit-identical, in ≥2 shards + model.safetensors.index.json,
                 plus generation_config.json, tokenizer.json, tokenizer_config.json
  gpt2           GPT2LMHeadModel: n_embd 64, 2 layers, 4 heads, vocab 96, n_positions 64
                 (Conv1D weights stored (in, out); lm_head tied to wte, so not saved)

PEFT adapters (`build_peft_case(kind, root)`, kinds in PEFT_CASE_KINDS): made by peft
itself with init_lora_weights=False (A and B random, B non-zero), saved with
save_pretrained. The adapter is built on the base as loaded from its folder, so
adapter_config.json's base_model_name_or_path is that folder. See `_PEFT_SPECS` for the
exact configs; the non-obvious parts: llama_dora perturbs the DoRA magnitudes (PEFT
initialises them to ‖W + ΔW‖, which would make DoRA merge like plain LoRA),
llama_modules_to_save perturbs the trainable lm_head copy, llama_lora_bias perturbs
lora_B.bias, llama_bf16 keeps the adapter in bf16 (autocast_adapter_dtype=False).
`PeftCase.peft_merged_state_dict()` is PEFT's own merge: the oracle for merge tests.

kohya (`build_kohya_case(root)`) and diffusers (`build_diffusers_case(kind, root)`):
hand-written files over a "mini-UNet + CLIP-ish" single-file base (`build_sd_base`),
each with the dense float64 update every adapted base weight should receive.

Malformed corpus (`malformed_files(root)`): files a reader must reject with a clear
error, plus `pickle_marker_path(root)`, the file a malicious pickle would create.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Never touch the network, whatever the caller's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 96
HIDDEN = 64


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for model init, and give the caller's state back after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence peft/transformers chatter while building (progress bars, deprecations).

    Known noise in peft 0.21.2 + transformers 5.23: a FutureWarning about
    `is_gradient_checkpointing`, a bogus "invalid shape" PeftWarning for 1-D
    lora_B.bias tensors, "Setting save_embedding_layers to True".
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _stamp(path: Path) -> Path:
    # A sibling file, so the built folder holds exactly what a real one would.
    return path.with_name(f".{path.name}.complete")


def _done(path: Path) -> bool:
    return _stamp(path).exists()


def _mark_done(path: Path) -> None:
    _stamp(path).write_text("")


# --------------------------------------------------------------------------- bases

BASE_KINDS = ("llama", "llama_bias", "llama_bf16", "llama_sharded", "gpt2")
_LLAMA_SEED = 1234
_GPT2_SEED = 4321


def _llama_model(attention_bias: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k_proj/v_proj: (32, 64), so (out, in) mix-ups show
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=attention_bias,
    )
    with _seeded(_LLAMA_SEED):
        model = LlamaForCausalLM(config)
        if attention_bias:
            # Llama initialises biases to zero; a zero base bias cannot tell "add the
            # LoRA bias" from "replace the bias".
            g = torch.Generator().manual_seed(_LLAMA_SEED + 1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(".bias"):
                        p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _gpt2_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos default to 50256, outside a 96-token vocabulary (transformers warns).
    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    with _seeded(_GPT2_SEED):
        model = GPT2LMHeadModel(config)
        # Conv1D biases start at zero; make them real so a merge that drops them shows.
        g = torch.Generator().manual_seed(_GPT2_SEED + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


_FAKE_TOKENIZER_JSON = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [{"id": 0, "content": "<unk>", "special": True}],
    "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"},
    "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "b": 2}, "unk_token": "<unk>"},
}
_FAKE_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                          "model_max_length": 64}


def build_base(kind: str, root: Path) -> Path:
    """Build (once) the base model folder `root/base-<kind>` and return its path."""
    if kind not in BASE_KINDS:
        raise ValueError(f"unknown base kind {kind!r}; expected one of {BASE_KINDS}")
    out = Path(root) / f"base-{kind}"
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _quiet():
        _save_base(kind, out)
    _mark_done(out)
    return out


def _save_base(kind: str, out: Path) -> None:
    if kind == "gpt2":
        _gpt2_model().save_pretrained(out)
    elif kind == "llama_bias":
        _llama_model(attention_bias=True).save_pretrained(out)
    elif kind == "llama_bf16":
        _llama_model().to(torch.bfloat16).save_pretrained(out)
    elif kind == "llama_sharded":
        model = _llama_model()
        # ~340 kB of fp32 weights: 100KB shards give several files; an MLP matrix
        # (32 kB) never has to be split across them.
        model.save_pretrained(out, max_shard_size="100KB")
        if not (out / "generation_config.json").exists():
            model.generation_config.save_pretrained(out)
        (out / "tokenizer.json").write_text(json.dumps(_FAKE_TOKENIZER_JSON, indent=2))
        (out / "tokenizer_config.json").write_text(json.dumps(_FAKE_TOKENIZER_CONFIG, indent=2))
    else:
        _llama_model().save_pretrained(out)


# --------------------------------------------------------------------------- PEFT

_LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class _PeftSpec:
    base: str
    config: dict[str, Any]
    seed: int
    perturb: Callable[[torch.nn.Module, torch.Generator], None] | None = None
    autocast_adapter_dtype: bool = True


def _perturb_dora_magnitudes(model: torch.nn.Module, g: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _perturb_saved_modules(model: torch.nn.Module, g: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if ".modules_to_save." in name:
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _perturb_lora_bias(model: torch.nn.Module, g: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if ".lora_B." in name and name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


_PEFT_SPECS: dict[str, _PeftSpec] = {
    "llama_plain": _PeftSpec("llama", dict(r=4, lora_alpha=8, target_modules=_LLAMA_ALL), 11),
    "llama_rslora": _PeftSpec(
        "llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), 12
    ),
    "llama_dora": _PeftSpec(
        "llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]), 13,
        _perturb_dora_magnitudes,
    ),
    # Pattern keys match with re.match(rf"(.*\.)?({key})$", module_path), first hit wins
    # (peft.utils.other.get_pattern_key): "q_proj" hits both layers, the v_proj key
    # only layer 1, "down_proj" both layers.
    "llama_patterns": _PeftSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
             rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2}, alpha_pattern={"down_proj": 32}),
        14,
    ),
    "llama_embedding": _PeftSpec("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), 15),
    "llama_modules_to_save": _PeftSpec(
        "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), 16,
        _perturb_saved_modules,
    ),
    "llama_lora_bias": _PeftSpec(
        "llama_bias", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True), 17,
        _perturb_lora_bias,
    ),
    "gpt2_conv1d": _PeftSpec(
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), 18
    ),
    # Without autocast_adapter_dtype=False PEFT would create the factors in fp32.
    "llama_bf16": _PeftSpec(
        "llama_bf16", dict(r=4, lora_alpha=8, target_modules=_LLAMA_ALL), 19, autocast_adapter_dtype=False
    ),
}
PEFT_CASE_KINDS: tuple[str, ...] = tuple(_PEFT_SPECS)


def _load_base(base_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def _merged_cached(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, autocast: bool) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with _quiet():
        model = PeftModel.from_pretrained(_load_base(base_dir, dtype), adapter_dir, autocast_adapter_dtype=autocast)
        merged = model.merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}


@dataclass(frozen=True)
class PeftCase:
    """A base model folder and a PEFT adapter folder made from it by peft itself."""

    name: str
    base_dir: Path
    adapter_dir: Path
    base_dtype: torch.dtype

    @property
    def adapter_file(self) -> Path:
        return self.adapter_dir / "adapter_model.safetensors"

    @property
    def adapter_config(self) -> dict[str, Any]:
        return json.loads((self.adapter_dir / "adapter_config.json").read_text())

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base as transformers loads it (same key names as the merged state dict)."""
        with _quiet():
            model = _load_base(self.base_dir, self.base_dtype)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def peft_merged_state_dict(self, autocast_adapter_dtype: bool = True) -> dict[str, torch.Tensor]:
        """PEFT's merge_and_unload() of this adapter into this base, on CPU, in base_dtype.

        With the default autocast_adapter_dtype=True, PEFT loads bf16/fp16 factors as
        fp32 (what PeftModel.from_pretrained does by default); pass False to merge with
        the factors in their stored dtype. Cached; each call returns fresh copies.
        """
        cached = _merged_cached(self.base_dir, self.adapter_dir, self.base_dtype, autocast_adapter_dtype)
        return {k: v.clone() for k, v in cached.items()}

    def peft_model(self, autocast_adapter_dtype: bool = True) -> torch.nn.Module:
        """A fresh, unmerged PeftModel in eval mode, for output comparisons."""
        from peft import PeftModel

        with _quiet():
            base = _load_base(self.base_dir, self.base_dtype)
            model = PeftModel.from_pretrained(base, self.adapter_dir, autocast_adapter_dtype=autocast_adapter_dtype)
        return model.eval()


def build_peft_case(kind: str, root: Path) -> PeftCase:
    """Build (once) the base and the adapter `root/peft-<kind>` for one PEFT case."""
    if kind not in _PEFT_SPECS:
        raise ValueError(f"unknown PEFT case {kind!r}; expected one of {PEFT_CASE_KINDS}")
    spec = _PEFT_SPECS[kind]
    base_dir = build_base(spec.base, root)
    dtype = torch.bfloat16 if spec.base == "llama_bf16" else torch.float32
    adapter_dir = Path(root) / f"peft-{kind}"
    case = PeftCase(kind, base_dir, adapter_dir, dtype)
    if _done(adapter_dir):
        return case

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **spec.config)
    with _quiet():
        with _seeded(spec.seed):
            model = get_peft_model(_load_base(base_dir, dtype), config,
                                   autocast_adapter_dtype=spec.autocast_adapter_dtype)
        if spec.perturb is not None:
            with torch.no_grad():
                spec.perturb(model, torch.Generator().manual_seed(spec.seed + 1000))
        model.save_pretrained(adapter_dir)
    _mark_done(adapter_dir)
    return case


# --------------------------------------------------------------------------- SD-style base

SD_TE = "text_model.encoder.layers.0.self_attn"
SD_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"

# A "mini-UNet" + CLIP-ish text encoder in one diffusers-named file. The attention's
# inner dim (48) differs from its input (32), so to_q/to_k/to_out.0 are not square.
SD_BASE_SHAPES: dict[str, tuple[int, ...]] = {
    "conv_in.weight": (16, 4, 3, 3),
    "conv_in.bias": (16,),
    "down_blocks.0.resnets.0.norm1.weight": (16,),
    "down_blocks.0.resnets.0.norm1.bias": (16,),
    "down_blocks.0.resnets.0.conv1.weight": (32, 16, 3, 3),
    "down_blocks.0.resnets.0.conv1.bias": (32,),
    "down_blocks.0.attentions.0.norm.weight": (32,),
    "down_blocks.0.attentions.0.proj_in.weight": (32, 32, 1, 1),
    "down_blocks.0.attentions.0.proj_in.bias": (32,),
    f"{SD_ATTN}.to_q.weight": (48, 32),
    f"{SD_ATTN}.to_k.weight": (48, 32),
    f"{SD_ATTN}.to_v.weight": (48, 32),
    f"{SD_ATTN}.to_out.0.weight": (32, 48),
    f"{SD_ATTN}.to_out.0.bias": (32,),
    "text_model.embeddings.token_embedding.weight": (VOCAB, 32),
    f"{SD_TE}.q_proj.weight": (32, 32),
    f"{SD_TE}.q_proj.bias": (32,),
    f"{SD_TE}.k_proj.weight": (32, 32),
}


def build_sd_base(root: Path) -> Path:
    """Build (once) the fp32 single-file base `root/sd-base/mini_sd.safetensors`."""
    path = Path(root) / "sd-base" / "mini_sd.safetensors"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    tensors = {k: torch.from_numpy(rng.normal(0.0, 0.1, size=s).astype(np.float32)) for k, s in SD_BASE_SHAPES.items()}
    _atomic_save(tensors, path, {"format": "pt"})
    return path


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _dense_update(up: np.ndarray, down: np.ndarray, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """scale · up.reshape(out, r) @ down.reshape(r, -1), reshaped to the weight's shape (float64)."""
    up64 = np.asarray(up, dtype=np.float64)
    down64 = np.asarray(down, dtype=np.float64)
    r = down64.shape[0]
    return (scale * (up64.reshape(up64.shape[0], r) @ down64.reshape(r, -1))).reshape(shape)


def _as64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


# --------------------------------------------------------------------------- kohya

@dataclass(frozen=True)
class KohyaCase:
    """A kohya sd-scripts LoRA (fp16 factors) over the SD-style base file.

    module_map: kohya module name -> base module path.
    expected_delta / scale: keyed by base weight key ("<module path>.weight"); the
    update is float64, computed from the stored fp16 values with scale = alpha / r.
    """

    base_file: Path
    lora_file: Path
    module_map: dict[str, str]
    expected_delta: dict[str, np.ndarray]
    scale: dict[str, float] = field(default_factory=dict)


# kohya name -> (module path, rank, alpha or None (=> alpha = r), alpha dtype)
_KOHYA_MODULES: dict[str, tuple[str, int, float | None, torch.dtype]] = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("down_blocks.0.attentions.0.proj_in", 4, 2.0, torch.float16),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (f"{SD_ATTN}.to_q", 4, 2.0, torch.float32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": (f"{SD_ATTN}.to_k", 4, None, torch.float32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": (
        f"{SD_ATTN}.to_out.0", 4, 2.0, torch.float32),
    # LoCon on a 3×3 conv: conv_dim 2, conv_alpha 0.5 (scale 0.25)
    "lora_unet_down_blocks_0_resnets_0_conv1": ("down_blocks.0.resnets.0.conv1", 2, 0.5, torch.float32),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (f"{SD_TE}.q_proj", 4, 2.0, torch.float32),
}


def build_kohya_case(root: Path) -> KohyaCase:
    """Build (once) `root/kohya/kohya_lora.safetensors` and its expected updates."""
    base_file = build_sd_base(root)
    lora_file = Path(root) / "kohya" / "kohya_lora.safetensors"
    g = torch.Generator().manual_seed(77)
    tensors: dict[str, torch.Tensor] = {}
    module_map: dict[str, str] = {}
    expected: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    for kname, (module, rank, alpha, alpha_dtype) in _KOHYA_MODULES.items():
        wshape = SD_BASE_SHAPES[f"{module}.weight"]
        out, inp, kernel = wshape[0], wshape[1], wshape[2:]
        down_shape = (rank, inp, *kernel)  # (r, in[, kh, kw])
        up_shape = (out, rank, *((1,) * len(kernel)))  # (out, r[, 1, 1])
        down = (0.2 * torch.randn(down_shape, generator=g)).to(torch.float16)
        up = (0.2 * torch.randn(up_shape, generator=g)).to(torch.float16)
        tensors[f"{kname}.lora_down.weight"] = down
        tensors[f"{kname}.lora_up.weight"] = up
        if alpha is not None:
            tensors[f"{kname}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
        scale = (alpha if alpha is not None else rank) / rank
        module_map[kname] = module
        expected[f"{module}.weight"] = _dense_update(_as64(up), _as64(down), scale, wshape)
        scales[f"{module}.weight"] = scale
    if not lora_file.exists():
        lora_file.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": "4",
            "ss_network_alpha": "2.0",
            "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "0.5"}),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
            "ss_output_name": "mini_kohya",
            "modelspec.architecture": "stable-diffusion-v1/lora",
        }
        _atomic_save(tensors, lora_file, metadata)
    return KohyaCase(base_file, lora_file, module_map, expected, scales)


# --------------------------------------------------------------------------- diffusers

DIFFUSERS_CASE_KINDS = ("diffusers_current", "diffusers_legacy")


@dataclass(frozen=True)
class DiffusersCase:
    """A diffusers LoRA file over the SD-style base file.

    module_names: the file's layer name (a key minus its ".lora_A.weight" /
    ".down.weight" tail, component prefix kept) -> base module path.
    expected_delta / scale: keyed by base module path (no ".weight"); float64 updates
    computed from the stored values.
    """

    name: str
    lora_file: Path
    base_file: Path
    module_names: dict[str, str]
    expected_delta: dict[str, np.ndarray]
    scale: dict[str, float]


def _lora_config_dict(**kwargs: Any) -> dict[str, Any]:
    """LoraConfig(**kwargs).to_dict() made JSON-able, as diffusers writes it."""
    from peft import LoraConfig

    d = LoraConfig(**kwargs).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def build_diffusers_case(kind: str, root: Path) -> DiffusersCase:
    """Build (once) `root/<kind>/pytorch_lora_weights.safetensors` and its expected updates.

    diffusers_current: PEFT keys prefixed by component, bf16 factors, header key
      `lora_adapter_metadata` = JSON of {"unet.<field>": …, "text_encoder.<field>": …}
      (diffusers' _pack_dict_with_prefix of LoraConfig.to_dict()); unet r=4, α=8
      (s=2, incl. the 1×1 conv proj_in), text_encoder r=4, α=2 (s=0.5).
    diffusers_legacy: attention-processor keys (`…attn1.processor.to_q_lora.down.weight`,
      `to_out_lora` -> `to_out.0`, `…q_proj.lora_linear_layer.up.weight`), fp32, no
      alphas (s=1).
    """
    if kind not in DIFFUSERS_CASE_KINDS:
        raise ValueError(f"unknown diffusers case {kind!r}; expected one of {DIFFUSERS_CASE_KINDS}")
    base_file = build_sd_base(root)
    lora_file = Path(root) / kind / "pytorch_lora_weights.safetensors"
    g = torch.Generator().manual_seed(88 if kind == "diffusers_current" else 99)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    expected: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}

    if kind == "diffusers_current":
        dtype = torch.bfloat16
        # file layer name -> (module path, rank, scale)
        layers = {
            f"unet.{SD_ATTN}.to_q": (f"{SD_ATTN}.to_q", 4, 2.0),
            f"unet.{SD_ATTN}.to_k": (f"{SD_ATTN}.to_k", 4, 2.0),
            f"unet.{SD_ATTN}.to_out.0": (f"{SD_ATTN}.to_out.0", 4, 2.0),
            "unet.down_blocks.0.attentions.0.proj_in": ("down_blocks.0.attentions.0.proj_in", 4, 2.0),
            f"text_encoder.{SD_TE}.q_proj": (f"{SD_TE}.q_proj", 4, 0.5),
        }
        a_name, b_name = "lora_A.weight", "lora_B.weight"
        unet_md = _lora_config_dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_out.0", "proj_in"],
                                    init_lora_weights="gaussian")
        te_md = _lora_config_dict(r=4, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="gaussian")
        packed = {f"unet.{k}": v for k, v in unet_md.items()} | {f"text_encoder.{k}": v for k, v in te_md.items()}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    else:
        dtype = torch.float32
        layers = {
            f"unet.{SD_ATTN}.processor.to_q_lora": (f"{SD_ATTN}.to_q", 4, 1.0),
            f"unet.{SD_ATTN}.processor.to_k_lora": (f"{SD_ATTN}.to_k", 4, 1.0),
            f"unet.{SD_ATTN}.processor.to_out_lora": (f"{SD_ATTN}.to_out.0", 4, 1.0),
            f"text_encoder.{SD_TE}.q_proj.lora_linear_layer": (f"{SD_TE}.q_proj", 4, 1.0),
        }
        a_name, b_name = "down.weight", "up.weight"
        metadata = {"format": "pt"}

    for layer, (module, rank, scale) in layers.items():
        wshape = SD_BASE_SHAPES[f"{module}.weight"]
        out, inp, kernel = wshape[0], wshape[1], wshape[2:]
        a = (0.2 * torch.randn((rank, inp, *kernel), generator=g)).to(dtype)  # (r, in[, 1, 1])
        b = (0.2 * torch.randn((out, rank, *((1,) * len(kernel))), generator=g)).to(dtype)  # (out, r[, 1, 1])
        tensors[f"{layer}.{a_name}"] = a
        tensors[f"{layer}.{b_name}"] = b
        names[layer] = module
        expected[module] = _dense_update(_as64(b), _as64(a), scale, wshape)
        scales[module] = scale
    if not lora_file.exists():
        lora_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, lora_file, metadata)
    return DiffusersCase(kind, lora_file, base_file, names, expected, scales)


# --------------------------------------------------------------------------- malformed

def write_safetensors_raw(
    path: Path,
    header: dict[str, Any] | str | bytes,
    data: bytes,
    *,
    header_len: int | None = None,
    pad: bool = True,
) -> Path:
    """Write a safetensors file byte by byte: u64-LE header length, header, data.

    header: a dict (JSON-encoded compactly) or the raw header text/bytes, so broken
    JSON, duplicate keys or invalid UTF-8 can be written. pad: pad the header with
    spaces to a multiple of 8 bytes, as safetensors does. header_len: the length to
    write in the prefix instead of the true one (to forge it).
    """
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = bytes(header)
    if pad:
        raw += b" " * (-len(raw) % 8)
    n = len(raw) if header_len is None else header_len
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _f32(*values: float) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


class _RunsCommand:
    """Unpickling this calls os.system(command): the classic malicious pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def write_malicious_pickle(path: Path, marker: Path) -> Path:
    """torch.save a state dict whose unpickling runs `touch <marker>`.

    torch.load(weights_only=False) or pickle-based loaders create `marker`; a safe
    loader (weights_only=True, or refusing .bin) does not.
    """
    payload = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, HIDDEN),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": _RunsCommand(
            f"touch {shlex.quote(str(marker))}"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def pickle_marker_path(root: Path) -> Path:
    """Where the malicious pickle of `malformed_files(root)` would create its marker."""
    return Path(root).resolve() / "malformed" / "PICKLE_CODE_RAN"


_VALID_ADAPTER_CONFIG = {
    "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
    "base_model_name_or_path": None, "task_type": "CAUSAL_LM", "bias": "none",
    "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
}


def malformed_files(root: Path) -> dict[str, Path]:
    """Build (once) the corpus under `root/malformed` and return name -> path.

    Single files (structurally broken safetensors):
      truncated, header_len_past_eof, header_len_absurd (2**63), header_not_json,
      header_not_utf8, empty, duplicate_keys, overlapping_offsets,
      shape_offsets_mismatch, unknown_dtype
    Valid safetensors with a semantic problem:
      nan_in_lora_a (PEFT keys, NaN in a lora_A; its folder also holds a valid
      adapter_config.json), no_lora_keys (just "foo.weight")
    Adapter folders:
      adapter_config_invalid_json, adapter_config_missing_r, pickle_bin (valid config
      plus an adapter_model.bin whose unpickling creates `pickle_marker_path(root)`)
    """
    base = Path(root) / "malformed"
    base.mkdir(parents=True, exist_ok=True)
    peft_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    peft_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    one = {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    files: dict[str, Path] = {}

    files["truncated"] = write_safetensors_raw(base / "truncated.safetensors", one, _f32(1, 2, 3))
    files["header_len_past_eof"] = write_safetensors_raw(
        base / "header_len_past_eof.safetensors", one, _f32(1, 2, 3, 4), header_len=10_000)
    files["header_len_absurd"] = write_safetensors_raw(
        base / "header_len_absurd.safetensors", one, _f32(1, 2, 3, 4), header_len=2**63)
    files["header_not_json"] = write_safetensors_raw(
        base / "header_not_json.safetensors", b'{"a.weight": {"dtype": "F32", "shape": [2, 2]', _f32(1, 2, 3, 4))
    files["header_not_utf8"] = write_safetensors_raw(
        base / "header_not_utf8.safetensors",
        b'{"a.\xff\xfe": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', _f32(1, 2, 3, 4))
    files["empty"] = base / "empty.safetensors"
    files["empty"].write_bytes(b"")
    # Either entry alone is consistent with the data, so json.loads (last one wins)
    # sees a valid file: only a reader that rejects duplicate keys notices.
    files["duplicate_keys"] = write_safetensors_raw(
        base / "duplicate_keys.safetensors",
        b'{"a.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a.weight":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}',
        _f32(1, 2))
    files["overlapping_offsets"] = write_safetensors_raw(
        base / "overlapping_offsets.safetensors",
        {"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
        _f32(1, 2, 3, 4, 5, 6))
    files["shape_offsets_mismatch"] = write_safetensors_raw(
        base / "shape_offsets_mismatch.safetensors",
        {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, _f32(1, 2, 3))
    files["unknown_dtype"] = write_safetensors_raw(
        base / "unknown_dtype.safetensors",
        {"a.weight": {"dtype": "F33", "shape": [2, 2], "data_offsets": [0, 16]}}, _f32(1, 2, 3, 4))

    nan_dir = base / "nan_in_lora_a"
    nan_dir.mkdir(exist_ok=True)
    a = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(5))
    a[1, 3] = float("nan")
    save_file({peft_a: a, peft_b: torch.randn(HIDDEN, 4, generator=torch.Generator().manual_seed(6))},
              str(nan_dir / "adapter_model.safetensors"))
    (nan_dir / "adapter_config.json").write_text(json.dumps(_VALID_ADAPTER_CONFIG, indent=2))
    files["nan_in_lora_a"] = nan_dir / "adapter_model.safetensors"

    files["no_lora_keys"] = base / "no_lora_keys.safetensors"
    save_file({"foo.weight": torch.ones(3, 2)}, str(files["no_lora_keys"]))

    bad_json = base / "adapter_config_invalid_json"
    bad_json.mkdir(exist_ok=True)
    (bad_json / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8,')
    _write_small_peft_weights(bad_json)
    files["adapter_config_invalid_json"] = bad_json

    no_r = base / "adapter_config_missing_r"
    no_r.mkdir(exist_ok=True)
    (no_r / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in _VALID_ADAPTER_CONFIG.items() if k != "r"}, indent=2))
    _write_small_peft_weights(no_r)
    files["adapter_config_missing_r"] = no_r

    pickle_dir = base / "pickle_bin"
    pickle_dir.mkdir(exist_ok=True)
    (pickle_dir / "adapter_config.json").write_text(json.dumps(_VALID_ADAPTER_CONFIG, indent=2))
    write_malicious_pickle(pickle_dir / "adapter_model.bin", pickle_marker_path(root))
    files["pickle_bin"] = pickle_dir
    return files


def _write_small_peft_weights(folder: Path) -> None:
    g = torch.Generator().manual_seed(7)
    save_file({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, HIDDEN, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(HIDDEN, 4, generator=g),
    }, str(folder / "adapter_model.safetensors"))
