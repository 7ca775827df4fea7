"""Fast synthetic Hugging Face Llama checkpoints and PEFT LoRA adapters for benchmarks.

Real Llama tensor names, shapes, dtype (bf16) and shard layout, random values:

    1b    Llama-3.2-1B: hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 kv heads
          (k/v_proj out 512), vocab 128256, tied embeddings (no lm_head tensor)
    8b    Llama-3.1-8B: hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 kv heads
          (k/v_proj out 1024), vocab 128256, untied lm_head
    tiny  a 2-layer toy with the same structure, for smoke tests

Values: one block of a few million N(0, 0.02) bf16 values is drawn once and every
tensor is filled by copying that block from a per-tensor random offset (so no two
tensors, and no two rows of one tensor, are alike); generation costs memcpy plus the
write, seconds for 1B. Shards are cut the way transformers' save_pretrained cuts them
(greedy, in state-dict order, a new shard when the next tensor would pass the limit),
named model-0000k-of-0000N.safetensors, with model.safetensors.index.json.

Used as a library by the bench_*.py scripts, and as a command:

    python benchmarks/synthetic.py base    --shape 1b  OUT_DIR
    python benchmarks/synthetic.py adapter --shape 1b  OUT_DIR [--rank 16] [--dtype bf16]

Needs torch and safetensors; transformers only to write a real LlamaConfig (a
hand-written equivalent is used when it is missing). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHT_STD = 0.02
POOL_VALUES = 4_194_301  # a prime, so the pool's period never lines up with a row
DEFAULT_SHARD_BYTES = 1_000_000_000  # transformers' "1GB" (decimal)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    model_id: str  # what base_model_name_or_path says (never downloaded)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(
        "tiny", hidden_size=128, num_hidden_layers=2, intermediate_size=344, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=2048,
        rope_theta=500000.0, rope_scaling=None, model_id="synthetic/llama-tiny",
    ),
    "1b": LlamaShape(
        "1b", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        model_id="meta-llama/Llama-3.2-1B",
    ),
    "8b": LlamaShape(
        "8b", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        model_id="meta-llama/Llama-3.1-8B",
    ),
}


def get_shape(shape: str | LlamaShape) -> LlamaShape:
    if isinstance(shape, LlamaShape):
        return shape
    try:
        return SHAPES[shape.lower()]
    except KeyError:
        raise ValueError(f"unknown shape {shape!r} (use {', '.join(SHAPES)})") from None


# -- tensor inventory ---------------------------------------------------------------------

def projection_shape(shape: LlamaShape, proj: str) -> tuple[int, int]:
    """(out, in) of a Linear weight in one decoder layer."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    return {
        "q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }[proj]


def module_path(layer: int, proj: str) -> str:
    block = "self_attn" if proj in ATTENTION else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in LlamaForCausalLM's state-dict order."""
    h = shape.hidden_size
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_hidden_layers):
        for proj in PROJECTIONS:
            out.append((f"{module_path(layer, proj)}.weight", projection_shape(shape, proj)))
        out.append((f"model.layers.{layer}.input_layernorm.weight", (h,)))
        out.append((f"model.layers.{layer}.post_attention_layernorm.weight", (h,)))
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        out.append(("lm_head.weight", (shape.vocab_size, h)))
    return out


def largest_tensor(shape: str | LlamaShape, itemsize: int = 2) -> tuple[str, int]:
    """(name, bytes) of the largest stored tensor (the embedding for Llama)."""
    name, dims = max(llama_tensors(get_shape(shape)), key=lambda t: math.prod(t[1]))
    return name, math.prod(dims) * itemsize


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int, itemsize: int = 2) -> list[list[str]]:
    """transformers' greedy split: a new shard when the next tensor would pass max_bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


# -- fast values ----------------------------------------------------------------------------

class Filler:
    """Tensors of N(0, std) values made by copying one pre-drawn block from random offsets."""

    def __init__(self, seed: int = 0, std: float = WEIGHT_STD, pool_values: int = POOL_VALUES,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        block = (torch.randn(pool_values, generator=self.generator, dtype=torch.float32) * std).to(dtype)
        self.pool = torch.cat([block, block])  # any window of pool_values starts anywhere
        self.period = pool_values
        self.dtype = dtype

    def offset(self) -> int:
        return int(torch.randint(0, self.period, (1,), generator=self.generator))

    def tensor(self, dims: tuple[int, ...], scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = math.prod(dims)
        out = torch.empty(n, dtype=self.dtype)
        start, pos = self.offset(), 0
        while pos < n:
            take = min(self.period, n - pos)
            out[pos:pos + take] = self.pool[start:start + take]
            pos += take
        if scale != 1.0:
            out.mul_(scale)
        out = out.reshape(dims)
        return out if dtype is None or dtype == self.dtype else out.to(dtype)


# -- base checkpoint ------------------------------------------------------------------------

def llama_config_dict(shape: LlamaShape) -> dict[str, Any]:
    """A real LlamaConfig.to_dict() when transformers is importable, else the same by hand."""
    kwargs: dict[str, Any] = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=shape.rope_theta,
        rope_scaling=shape.rope_scaling, tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=128000 if shape.vocab_size > 128001 else 1,
        eos_token_id=128001 if shape.vocab_size > 128001 else 2,
        hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
        architectures=["LlamaForCausalLM"], use_cache=True, pretraining_tp=1,
    )
    try:
        from transformers import LlamaConfig
    except ImportError:
        config = dict(kwargs, model_type="llama", torch_dtype="bfloat16", attention_dropout=0.0)
        return config
    config_obj = LlamaConfig(**kwargs)
    if "dtype" in config_obj.to_dict():  # transformers >= 4.56 calls it dtype
        config_obj.dtype = torch.bfloat16
    else:  # pragma: no cover - older transformers
        config_obj.torch_dtype = torch.bfloat16
    config = config_obj.to_dict()
    for key in ("dtype", "torch_dtype"):
        if key in config and not isinstance(config[key], str):
            config[key] = str(config[key]).removeprefix("torch.")
    return config


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass
class BaseInfo:
    path: str
    shape: str
    n_tensors: int
    n_params: int
    total_bytes: int
    shards: list[str]
    max_shard_bytes: int
    largest_tensor: str
    largest_tensor_bytes: int
    seconds: float


def write_base(out: str | os.PathLike[str], shape: str | LlamaShape = "1b", *,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0) -> BaseInfo:
    """A Hugging Face Llama folder: config, generation config, tokenizer config, bf16 shards, index."""
    started = time.perf_counter()
    spec = get_shape(shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(spec)
    dims = dict(tensors)
    shard_lists = plan_shards(tensors, max_shard_bytes)
    n = len(shard_lists)
    shard_names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    if n == 1:
        shard_names = ["model.safetensors"]
    filler = Filler(seed)
    weight_map: dict[str, str] = {}
    for shard_name, names in zip(shard_names, shard_lists):
        data: dict[str, torch.Tensor] = {}
        for name in names:
            if name.endswith("norm.weight"):  # RMSNorm gains: around 1
                data[name] = 1.0 + filler.tensor(dims[name], scale=5.0)
            else:
                data[name] = filler.tensor(dims[name])
            weight_map[name] = shard_name
        save_file(data, str(out / shard_name), metadata={"format": "pt"})
        del data
    total = sum(math.prod(d) * 2 for _, d in tensors)
    if n > 1:
        _write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": total, "total_parameters": total // 2},
            "weight_map": dict(sorted(weight_map.items())),
        })
    _write_json(out / "config.json", llama_config_dict(spec))
    bos = 128000 if spec.vocab_size > 128001 else 1
    eos = 128001 if spec.vocab_size > 128001 else 2
    _write_json(out / "generation_config.json", {
        "_from_model_config": False, "bos_token_id": bos, "eos_token_id": eos,
        "do_sample": True, "temperature": 0.6, "top_p": 0.9,
    })
    _write_json(out / "tokenizer_config.json", {  # small and fake: no tokenizer.json to load
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": True, "note": "synthetic benchmark checkpoint, no vocabulary",
    })
    largest_name, largest_bytes = largest_tensor(spec)
    return BaseInfo(
        path=os.fspath(out), shape=spec.name, n_tensors=len(tensors), n_params=total // 2, total_bytes=total,
        shards=shard_names, max_shard_bytes=max_shard_bytes, largest_tensor=largest_name,
        largest_tensor_bytes=largest_bytes, seconds=time.perf_counter() - started,
    )


# -- PEFT adapter ---------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    path: str
    shape: str
    rank: int
    alpha: float
    dtype: str
    target_modules: list[str]
    n_modules: int
    n_params: int
    delta_rel: float
    seconds: float
    modules: list[str] = field(default_factory=list)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_adapter(out: str | os.PathLike[str], shape: str | LlamaShape = "1b", *, rank: int = 16,
                  alpha: float | None = None, dtype: str = "bf16", target_modules: tuple[str, ...] = PROJECTIONS,
                  layers: list[int] | None = None, delta_rel: float = 0.05, seed: int = 1,
                  base_model_name_or_path: str | None = None) -> AdapterInfo:
    """A PEFT LoRA adapter folder with random non-zero factors.

    A ~ N(0, 1/in) (the scale of PEFT's Kaiming init), B chosen so that the update
    s·B·A has an RMS of `delta_rel` times the base weights' (0.02): a trained-looking
    ‖ΔW‖/‖W0‖ of a few percent, large enough that a bf16 merge visibly changes bits.
    """
    started = time.perf_counter()
    spec = get_shape(shape)
    alpha = float(2 * rank if alpha is None else alpha)
    scale = alpha / rank
    torch_dtype = _DTYPES[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    layer_ids = list(range(spec.num_hidden_layers)) if layers is None else layers
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    n_params = 0
    for layer in layer_ids:
        for proj in target_modules:
            out_f, in_f = projection_shape(spec, proj)
            std_a = 1.0 / math.sqrt(in_f)
            std_b = delta_rel * WEIGHT_STD / (scale * math.sqrt(rank) * std_a)
            a = torch.randn(rank, in_f, generator=generator) * std_a
            b = torch.randn(out_f, rank, generator=generator) * std_b
            prefix = f"base_model.model.{module_path(layer, proj)}"
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch_dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch_dtype).contiguous()
            modules.append(module_path(layer, proj))
            n_params += a.numel() + b.numel()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted(target_modules), "base_model_name_or_path": base_model_name_or_path or spec.model_id,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    _write_json(out / "adapter_config.json", config)
    return AdapterInfo(
        path=os.fspath(out), shape=spec.name, rank=rank, alpha=alpha, dtype=dtype,
        target_modules=list(target_modules), n_modules=len(modules), n_params=n_params, delta_rel=delta_rel,
        seconds=time.perf_counter() - started, modules=modules,
    )


# -- shared helpers for the bench scripts ---------------------------------------------------

def cat_to_devnull(folder: str | os.PathLike[str], chunk: int = 64 * 1024 * 1024) -> float:
    """Read every .safetensors file under `folder` once (warms the page cache); seconds."""
    started = time.perf_counter()
    buffer = bytearray(chunk)
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("base", help="write a synthetic Llama checkpoint folder")
    b.add_argument("out")
    b.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    b.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    b.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("adapter", help="write a synthetic PEFT LoRA adapter folder")
    a.add_argument("out")
    a.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--alpha", type=float, default=None, help="default 2·rank")
    a.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    a.add_argument("--delta-rel", type=float, default=0.05)
    a.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what == "base":
        info: Any = write_base(args.out, args.shape, max_shard_bytes=args.max_shard_bytes, seed=args.seed)
    else:
        info = write_adapter(args.out, args.shape, rank=args.rank, alpha=args.alpha, dtype=args.dtype,
                             delta_rel=args.delta_rel, seed=args.seed)
        info.modules = []
    json.dump(asdict(info), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
