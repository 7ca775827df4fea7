"""LyCORIS adapter fixtures, made by lycoris-lora itself (the library that defines the format).

Like tests/builders.py: offline, seeded, idempotent (a folder holding its stamp is
reused), nothing imported from lora_tools. lycoris-lora is the oracle here the way peft
is for PEFT files; it is imported only while a case is being built, so the expected
values of an already built case need nothing but numpy, torch and safetensors.

Every case lives in `root/lycoris/<kind>/`: `base.safetensors` (the fp32 state_dict of a
tiny model, below) and `<kind>.safetensors`, written by the network's own
`LycorisNetwork.save_weights(path, dtype, metadata)`. The network is built with
`lycoris.create_lycoris(model, 1.0, linear_dim, linear_alpha, algo=..., ...)` with
alpha != dim, then EVERY adapter parameter is randomised (LyCORIS zeroes one side at
init), and the file is saved.

The tiny model (module path -> layer; all of them adapted, the LayerNorm is not):
  blocks.0.norm                LayerNorm(48)                 (never adapted)
  blocks.0.attn_to_q           Linear 48 -> 32, no bias      weight (32, 48)
  blocks.0.ff.proj_out         Linear 32 -> 24, bias         weight (24, 32)
  blocks.0.proj_in             Conv2d 8 -> 12, 1x1, bias     weight (12, 8, 1, 1)
  blocks.0.res_block.conv1     Conv2d 16 -> 24, 3x3, pad 1   weight (24, 16, 3, 3)
LyCORIS names a module "lycoris_" + path with every "." replaced by "_", so
"blocks.0.ff.proj_out" is "lycoris_blocks_0_ff_proj_out" (not ".ff.proj.out"): resolving
a name needs the base's tensor names.

Cases (LYCORIS_CASE_KINDS; alpha/dim per layer type, see _SPECS for all settings):
  loha            hada_w1_a/w1_b/w2_a/w2_b everywhere (3x3 conv: w*_b flat (r, in·9))
  loha_tucker     use_tucker: the 3x3 conv adds hada_t1/hada_t2, w*_a (r, out), w*_b (r, in)
  lokr_factored   decompose_both: w1_a/w1_b + w2_a/w2_b (attn_to_q, 3x3 conv), lokr_w1 +
                  w2_a/w2_b (ff.proj_out), lokr_w1 + lokr_w2 forced (proj_in: scale 1)
  lokr_full       full_matrix: lokr_w1 + lokr_w2 everywhere, alpha ignored
  lokr_tucker     use_tucker: the 3x3 conv has lokr_w1 + lokr_t2/w2_a/w2_b (extra kind)
  locon_tucker    lora_up/lora_down, lora_mid on the 3x3 conv; metadata None
  full            diff (+ diff_b where the layer has a bias); metadata None
  locon_dora_out  LoCon + dora_scale (out, 1[,1,1]) (wd_on_output=True)
  locon_dora_in   LoCon + dora_scale (1, in[,1,1]) (wd_on_output=False)
  loha_bf16       the loha settings, every tensor (alpha too) saved as bf16
The file holds no multiplier: the truth is at multiplier 1.

THE TRUTH (LycorisModule.merged) is the weight the trained network's forward pass uses
(non-bypass forward, multiplier 1), evaluated in float64 from the tensors AS STORED in
the file (so bf16 rounding is included) with the formulas below; `_build` checks it
against LyCORIS' own fp32 forward (max |y - x·W'ᵀ - b| <= 1e-5 on random inputs, every
module, every case) and tests/test_lycoris_builders.py checks it in float64 against a
network that LyCORIS loads back from the file. It is NOT what LyCORIS' merge_to writes
for LoHa/LoKr (see the bug note at the end). For `full` it is W0 + diff as stored (what
a network loaded from the file uses; the trained one held W' with diff = fl32(W' - W0)).

Facts relied on (lycoris-lora 4.1.3, paths under site-packages/lycoris/):
  Naming, targets. wrapper.py:create_modules (L427-) walks model.named_modules(); a
    module whose class is in TARGET_REPLACE_MODULE gets create_modules_(f"{prefix}_{name}")
    and its lora_name = that prefix with "." -> "_" (L404-416); LORA_PREFIX = "lycoris"
    (L207). The kohya wrapper (kohya.py L305-306, L491) does the same with "lora_unet" /
    "lora_te[N]". The "full" preset only sets unet_/text_encoder_ target lists, which
    LycorisNetwork.apply_preset (L214-235) ignores, so the Linear/Conv targets come from
    the class attribute: this module sets them explicitly (and restores them).
  dim/alpha per layer. wrapper.py:create_single_module (L327-348): Linear and convs with
    kernel_size[0] == 1 get (linear_dim, linear_alpha); other convs (conv_dim, conv_alpha).
  Stored alpha. modules/{locon,loha,lokr}.py __init__: scale = alpha / r_factor,
    r_factor = dim (sqrt(dim) with rs_lora) and the buffer "alpha" = alpha·dim/r_factor
    (locon L145-155, loha L130-140, lokr L207-220), so a reader's alpha/dim is the scale
    either way. alpha None/0 -> dim.
  LoKr ignores alpha when W1 and W2 are both full: lokr.py L210-212 sets alpha = dim, so
    scale = 1 and the stored alpha is the creation dim (not recoverable from shapes).
  Saved keys. custom_state_dict of each module (locon L244-253, loha L249-261,
    lokr L400-418, full L129-133); the use_scalar factor is folded into
    lora_up / hada_w1_a / lokr_w1(_a); full stores diff = W' - W0 and diff_b.
  save_weights (wrapper.py L701-721): state_dict cast to `dtype` (alpha included),
    metadata written exactly as given; None or {} becomes {} -> a header with an empty
    "__metadata__": {}. (The kohya wrapper's save_weights, kohya.py L878-899, adds
    "sshs_model_hash".)
  Formulas, forward (non-bypass), multiplier m:
    LoCon  locon.py:forward L325-348 -> make_weight L205-221 -> functional/locon.py
           _diff_weight L38-52: ΔW = up @ down (conv: up (out,r,1,1), down (r,in,kh,kw));
           tucker: ΔW[o,i,..] = Σ up[o,p]·mid[p,q,..]·down[q,i] (rebuild_tucker,
           functional/general.py L12-14). W' = W0 + m·scale·ΔW.
    LoHa   loha.py:forward L307-328 -> get_weight L196-228 (gamma = scale) ->
           functional/loha.py _diff_weight L123-140: ΔW = scale·(w1a@w1b)⊙(w2a@w2b);
           tucker (HadaWeightTucker L40-43): einsum("i j ..., j r, i p -> p r ...",
           t1, w1_b, w1_a), i.e. hada_w1_a is (r, out) and hada_w1_b (r, in).
    LoKr   lokr.py:_rebuild_forward L560-576 -> get_weight L359-379 (scale = self.scale) ->
           functional/lokr.py _kron_weight L129-140, make_kron L16-25: ΔW =
           scale·kron(W1, W2), W1 = lokr_w1 or w1_a@w1_b, W2 = lokr_w2, or
           (w2_a @ w2_b).reshape(b, d, *k) (w2_b is stored flat (r, d·kh·kw)), or tucker
           rebuild_tucker(t2, w2_a, w2_b) with w2_a (r, b), w2_b (r, d).
    Full   full.py: apply_to L109-121 folds W0 into the parameter; make_weight
           L157-190 / forward L221-257 use W0 + m·diff and b0 + m·diff_b.
    DoRA   functional/general.py:_weight_decompose L117-139 on V = W0 + ΔW (ΔW with its
           scale, without m): W' = V·dora_scale/(‖V‖ + eps), eps = finfo(dtype).eps,
           ‖V‖ per output row (wd_on_output=True; dora_scale (out,1[,1,1])) or per input
           column over (out, kh, kw) (False; dora_scale (1,in[,1,1])); for m != 1 the
           factor is m·(dora_scale/‖V‖ - 1) + 1. The truth here leaves eps out
           (relative effect ~1e-7, below fp32 resolution).
  Bug (not copied): loha.py:get_diff_weight L230-235 and lokr.py:get_diff_weight
    L381-386 multiply get_weight(), which already carries the scale, by the scale again;
    get_merged_weight (L237-244 / L388-395) and so base.py:merge_to L397-418 (plain and
    precise) therefore merge W0 + scale²·(product) when alpha != dim. LoCon's make_weight
    uses gamma=1 (locon.py L209-211), so its merge is right. merge_to(precise=True)
    (base.py L561-587) calls get_diff_weight(shape=None), the flat (out, in·kh·kw) matrix
    for a non-tucker LoHa/LoKr conv, and raises on it.
  Loader defects (so the self-checks load files with load_state_dict into a network made
    with the case's settings): create_lycoris_from_weights -> make_module_from_state_dict
    never passes wd_on_out (locon.py L171-189, same in loha/lokr), so a (1, in, …)
    dora_scale fails to copy; LoKr's reads the rank as lokr_w2_a.size(1) (lokr.py L264-267),
    which in the tucker layout (r, b) is b, and builds the wrong module.
  Bypass mode (bypass_mode=True) computes the same ΔW for LoCon/LoHa/LoKr but skips DoRA
    entirely (locon.py L330-331, loha.py L312-313 return bypass_forward before any wd).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from builders import _atomic_save, _done, _mark_done, _seeded
from safetensors import safe_open
from safetensors.torch import load_file

# --------------------------------------------------------------------------- the tiny model

_MODEL_SEED = 4242

# module path -> weight shape (all adapted)
LYCORIS_MODULE_SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn_to_q": (32, 48),
    "blocks.0.ff.proj_out": (24, 32),
    "blocks.0.proj_in": (12, 8, 1, 1),
    "blocks.0.res_block.conv1": (24, 16, 3, 3),
}
_CONV_PADDING = {"blocks.0.proj_in": 0, "blocks.0.res_block.conv1": 1}


class _Sub(torch.nn.Module):
    """A plain container, so paths get an extra dotted level ("ff.proj_out")."""


class _TinyBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(48)
        self.attn_to_q = torch.nn.Linear(48, 32, bias=False)
        self.ff = _Sub()
        self.ff.proj_out = torch.nn.Linear(32, 24)
        self.proj_in = torch.nn.Conv2d(8, 12, 1)
        self.res_block = _Sub()
        self.res_block.conv1 = torch.nn.Conv2d(16, 24, 3, padding=1)


class TinyLycorisModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_TinyBlock()])


def tiny_model() -> TinyLycorisModel:
    """The seeded fp32 base every case is built on (its state_dict is base.safetensors)."""
    with _seeded(_MODEL_SEED):
        model = TinyLycorisModel()
        g = torch.Generator().manual_seed(_MODEL_SEED + 1)
        norm = model.blocks[0].norm
        assert isinstance(norm, torch.nn.LayerNorm)
        with torch.no_grad():
            norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=g))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=g))
    return model.eval()


def lycoris_prefix(module_path: str, prefix: str = "lycoris") -> str:
    """LyCORIS' key prefix for a module path (wrapper.py L404-416)."""
    return f"{prefix}_{module_path}".replace(".", "_")


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class _Spec:
    algo: str
    dim: int
    alpha: float
    conv_dim: int
    conv_alpha: float
    seed: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    metadata: bool = True


_SPECS: dict[str, _Spec] = {
    # scale 1.5 (linear, 1x1) / 0.5 (3x3); hada_w*_b of the 3x3 conv is (r, 16·9)
    "loha": _Spec("loha", 4, 6.0, 2, 1.0, 101),
    # tucker only where k != 1: the 3x3 conv gets hada_t1/t2 (3,3,3,3), scale 1.5
    "loha_tucker": _Spec("loha", 4, 2.0, 3, 4.5, 102, dict(use_tucker=True)),
    # decompose_both: attn_to_q / 3x3 conv get w1_a/w1_b, ff.proj_out full w1 (4x4:
    # dim 2 is not < 4/2); proj_in (w1 3x2, w2 4x4) is forced to full w1 AND full w2,
    # so there alpha is ignored (scale 1)
    "lokr_factored": _Spec("lokr", 2, 3.0, 1, 0.5, 103, dict(decompose_both=True)),
    # full_matrix: lokr_w1 + lokr_w2 everywhere, alpha ignored (scale 1, stored alpha = dim)
    "lokr_full": _Spec("lokr", 4, 8.0, 2, 1.0, 104, dict(full_matrix=True)),
    # 3x3 conv: full w1 (4,4), w2 = tucker(lokr_t2 (2,2,3,3), w2_a (2,6), w2_b (2,4)), scale 1.5
    "lokr_tucker": _Spec("lokr", 2, 1.0, 2, 3.0, 105, dict(use_tucker=True)),
    # lora_mid (3,3,3,3) on the 3x3 conv, scale 0.5 (linear) / 2.0 (3x3); no metadata
    "locon_tucker": _Spec("locon", 4, 2.0, 3, 6.0, 106, dict(use_tucker=True), metadata=False),
    "full": _Spec("full", 4, 1.0, 4, 1.0, 107, metadata=False),
    "locon_dora_out": _Spec("locon", 4, 8.0, 2, 1.0, 108, dict(dora_wd=True, wd_on_output=True)),
    "locon_dora_in": _Spec("locon", 4, 8.0, 2, 1.0, 109, dict(dora_wd=True, wd_on_output=False)),
    # the loha case again, every tensor (alpha included) stored as bf16
    "loha_bf16": _Spec("loha", 4, 6.0, 2, 1.0, 110, dtype=torch.bfloat16),
}
LYCORIS_CASE_KINDS: tuple[str, ...] = tuple(_SPECS)


@dataclass(frozen=True)
class LycorisModule:
    """One adapted module: where it is, and what the forward pass does to it (float64).

    alpha: the "alpha" tensor as stored (None for full); dim: the rank alpha is divided
    by (None where the file has no factored matrix: full, LoKr with W1 and W2 full);
    scale: the factor LyCORIS applies to ΔW (1.0 for full and for LoKr with both full).
    dora_on_output: None without DoRA, else the wd_on_output flag it was trained with.
    """

    module: str
    prefix: str
    algo: str
    weight_shape: tuple[int, ...]
    merged: np.ndarray
    delta: np.ndarray
    bias_delta: np.ndarray | None
    alpha: float | None = None
    dim: int | None = None
    scale: float = 1.0
    tucker: bool = False
    dora_on_output: bool | None = None


@dataclass(frozen=True)
class LycorisCase:
    name: str
    lora_file: Path
    base_file: Path
    modules: dict[str, LycorisModule]  # keyed by module path
    dtype: str  # "F32" / "BF16": the dtype of every tensor in lora_file
    metadata: dict[str, str] = field(default_factory=dict)  # lora_file's header metadata

    def base_tensors(self) -> dict[str, np.ndarray]:
        """base.safetensors as float64 arrays."""
        return {k: v.to(torch.float64).numpy() for k, v in load_file(self.base_file).items()}


def build_lycoris_case(kind: str, root: Path) -> LycorisCase:
    """Build (once) `root/lycoris/<kind>/` and return the case with its float64 truth."""
    if kind not in _SPECS:
        raise ValueError(f"unknown LyCORIS case {kind!r}; expected one of {LYCORIS_CASE_KINDS}")
    spec = _SPECS[kind]
    out = Path(root) / "lycoris" / kind
    base_file = out / "base.safetensors"
    lora_file = out / f"{kind}.safetensors"
    if not _done(out):
        out.mkdir(parents=True, exist_ok=True)
        _build(kind, spec, base_file, lora_file)
        _mark_done(out)
    return _load_case(kind, spec, base_file, lora_file)


# --------------------------------------------------------------------------- building


@contextmanager
def _lycoris_targets() -> Iterator[type]:
    """LycorisNetwork with Linear/Conv2d targets and the "lycoris" prefix; class state restored."""
    from lycoris.logging import logger
    from lycoris.wrapper import LycorisNetwork

    names = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
             "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {n: getattr(LycorisNetwork, n) for n in names}
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        LycorisNetwork.apply_preset({
            "enable_conv": True, "target_module": ["Linear", "Conv2d"], "target_name": [],
            "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": "lycoris", "use_fnmatch": False,
            "exclude_name": [],
        })
        yield LycorisNetwork
    finally:
        for n, v in saved.items():
            setattr(LycorisNetwork, n, v)
        logger.setLevel(level)


def _metadata(kind: str, spec: _Spec) -> dict[str, str] | None:
    if not spec.metadata:
        return None
    args = {"algo": spec.algo, "conv_dim": str(spec.conv_dim), "conv_alpha": str(spec.conv_alpha)}
    args.update({k: str(v) for k, v in spec.kwargs.items()})
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(spec.dim),
        "ss_network_alpha": str(spec.alpha),
        "ss_network_args": json.dumps(args),
        "ss_output_name": kind,
    }


def _randomise(network: Any, spec: _Spec) -> None:
    """Give every adapter parameter random values (after apply_to; seeded)."""
    g = torch.Generator().manual_seed(spec.seed)
    std = {"loha": 0.4, "lokr": 0.3, "locon": 0.2}.get(spec.algo, 0.05)
    with torch.no_grad():
        for lora in sorted(network.loras, key=lambda m: m.lora_name):
            for name, p in sorted(lora.named_parameters(), key=lambda kv: kv[0]):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
                if name == "dora_scale":
                    # the init is ‖W0‖; perturb it, or DoRA would barely differ from LoRA
                    p.mul_(1.0 + 0.2 * noise)
                elif spec.algo == "full":
                    p.add_(0.05 * noise)  # after apply_to these hold W0 (+ b0): W' = W0 + diff
                else:
                    p.copy_(std * noise)
                if spec.dtype != torch.float32 and spec.algo != "full":
                    # what the file will hold, so the fp32 forward below uses the stored values
                    p.copy_(p.to(spec.dtype).to(p.dtype))


def _build(kind: str, spec: _Spec, base_file: Path, lora_file: Path) -> None:
    import lycoris

    model = tiny_model()
    _atomic_save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, base_file, {"format": "pt"})

    with _lycoris_targets():
        network = lycoris.create_lycoris(
            model, 1.0, linear_dim=spec.dim, linear_alpha=spec.alpha, algo=spec.algo,
            conv_dim=spec.conv_dim, conv_alpha=spec.conv_alpha, preset="full", **spec.kwargs,
        )
    network.apply_to()
    names = sorted(m.lora_name for m in network.loras)
    assert names == sorted(lycoris_prefix(p) for p in LYCORIS_MODULE_SHAPES), names
    _randomise(network, spec)
    network.eval()

    # The network's own writer; a .safetensors name is what selects safetensors in it.
    tmp = lora_file.with_name(f".tmp-{lora_file.name}")
    network.save_weights(str(tmp), spec.dtype, _metadata(kind, spec))
    os.replace(tmp, lora_file)

    # The truth from the file must be what LyCORIS' own fp32 forward computes.
    case = _load_case(kind, spec, base_file, lora_file)
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for path, mod in case.modules.items():
            layer = model.get_submodule(path)
            base_bias = _base_bias(case, path)
            bias = None if base_bias is None else base_bias + (0 if mod.bias_delta is None else mod.bias_delta)
            y, y_true = _forward_pair(layer, path, mod.merged, bias, torch.float32, g)
            err = (y.double() - y_true).abs().max().item()
            assert err <= 1e-5, f"{kind}: {path}: LyCORIS forward differs from the truth by {err}"


def _base_bias(case: LycorisCase, path: str) -> np.ndarray | None:
    with safe_open(str(case.base_file), "pt") as f:
        return f.get_tensor(f"{path}.bias").double().numpy() if f"{path}.bias" in f.keys() else None


def _forward_pair(layer: torch.nn.Module, path: str, merged: np.ndarray, bias: np.ndarray | None,
                  dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(x), op(x, W', b')) on a random x; the reference in float64."""
    shape = LYCORIS_MODULE_SHAPES[path]
    w = torch.from_numpy(merged)
    b = None if bias is None else torch.from_numpy(bias)
    if len(shape) == 2:
        x = torch.randn(3, 5, shape[1], generator=g)
        ref = F.linear(x.double(), w, b)
    else:
        x = torch.randn(2, shape[1], 6, 6, generator=g)
        ref = F.conv2d(x.double(), w, b, padding=_CONV_PADDING[path])
    return layer(x.to(dtype)), ref


# --------------------------------------------------------------------------- the truth (numpy, float64)


def _load_case(kind: str, spec: _Spec, base_file: Path, lora_file: Path) -> LycorisCase:
    base = {k: v.to(torch.float64).numpy() for k, v in load_file(base_file).items()}
    with safe_open(str(lora_file), "pt") as f:
        metadata = dict(f.metadata() or {})
        raw = {k: f.get_tensor(k) for k in f.keys()}
    dtypes = {str(v.dtype) for v in raw.values()}
    assert len(dtypes) == 1, dtypes
    sd = {k: v.to(torch.float64).numpy() for k, v in raw.items()}
    wd_on_out = spec.kwargs.get("wd_on_output") if spec.kwargs.get("dora_wd") else None
    modules = {path: _truth(path, shape, spec.algo, base, sd, wd_on_out) for path, shape in LYCORIS_MODULE_SHAPES.items()}
    dtype = {"torch.float32": "F32", "torch.bfloat16": "BF16"}[dtypes.pop()]
    return LycorisCase(kind, lora_file, base_file, modules, dtype, metadata)


def _truth(path: str, shape: tuple[int, ...], algo: str, base: dict[str, np.ndarray], sd: dict[str, np.ndarray],
           wd_on_out: bool | None) -> LycorisModule:
    p = lycoris_prefix(path)

    def opt(name: str) -> np.ndarray | None:
        return sd.get(f"{p}.{name}")

    def req(name: str) -> np.ndarray:
        return sd[f"{p}.{name}"]

    w0 = base[f"{path}.weight"]
    out_dim, in_dim, *k = shape
    alpha_t = opt("alpha")
    alpha = None if alpha_t is None else float(alpha_t)
    bias_delta = None
    tucker = False
    dim: int | None

    if algo == "full":
        delta = req("diff")
        return LycorisModule(path, p, "full", shape, w0 + delta, delta, opt("diff_b"), None, None, 1.0)

    if algo == "locon":
        up, down, mid = req("lora_up.weight"), req("lora_down.weight"), opt("lora_mid.weight")
        dim = down.shape[0]
        scale = (alpha if alpha else dim) / dim
        up2 = up.reshape(out_dim, dim)
        if mid is None:
            prod = (up2 @ down.reshape(dim, -1)).reshape(shape)
        else:
            tucker = True
            prod = np.einsum("op,pq...,qi->oi...", up2, mid, down.reshape(dim, in_dim))
    elif algo == "loha":
        w1a, w1b, w2a, w2b = req("hada_w1_a"), req("hada_w1_b"), req("hada_w2_a"), req("hada_w2_b")
        t1, t2 = opt("hada_t1"), opt("hada_t2")
        dim = w1b.shape[0]
        scale = (alpha if alpha else dim) / dim
        if t1 is None or t2 is None:
            prod = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape)
        else:
            tucker = True
            # hada_w*_a (r, out), hada_w*_b (r, in), hada_t* (r, r, kh, kw)
            prod = np.einsum("ij...,jr,ip->pr...", t1, w1b, w1a) * np.einsum("ij...,jr,ip->pr...", t2, w2b, w2a)
    elif algo == "lokr":
        w1, w2, t2 = opt("lokr_w1"), opt("lokr_w2"), opt("lokr_t2")
        dim = None
        if w1 is None:
            w1b = req("lokr_w1_b")
            w1 = req("lokr_w1_a") @ w1b
            dim = w1b.shape[0]
        if w2 is None:
            w2a, w2b = req("lokr_w2_a"), req("lokr_w2_b")
            dim = w2b.shape[0] if dim is None else dim
            if t2 is not None:
                tucker = True
                w2 = np.einsum("ij...,ip,jr->pr...", t2, w2a, w2b)  # w2_a (r, b), w2_b (r, d)
            else:
                w2 = (w2a @ w2b).reshape(w2a.shape[0], -1, *k)  # w2_b stored flat (r, d·kh·kw)
        # both full: LyCORIS sets alpha = dim, i.e. scale 1, whatever alpha says
        scale = 1.0 if dim is None else (alpha if alpha else dim) / dim
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))
        prod = np.kron(w1, w2)
    else:  # pragma: no cover
        raise ValueError(algo)

    assert prod.shape == shape, (path, prod.shape, shape)
    delta = scale * prod
    v = w0 + delta
    dora_scale = opt("dora_scale")
    if dora_scale is not None:
        if wd_on_out:
            norm = np.linalg.norm(v.reshape(out_dim, -1), axis=1).reshape(out_dim, *([1] * (v.ndim - 1)))
        else:
            norm = np.linalg.norm(np.swapaxes(v, 0, 1).reshape(in_dim, -1), axis=1).reshape(1, in_dim, *([1] * (v.ndim - 2)))
        assert dora_scale.shape == norm.shape, (dora_scale.shape, norm.shape)
        merged = v * (dora_scale / norm)
        delta = merged - w0
    else:
        merged = v
    return LycorisModule(path, p, algo, shape, merged, delta, bias_delta, alpha, dim, scale, tucker,
                         None if dora_scale is None else bool(wd_on_out))
