"""merge against PEFT's own merge_and_unload, against float64 truth, and against the
layout of the base (issue #4).

The oracles, each independent of lora_tools:
- PEFT itself: `PeftCase.peft_merged_state_dict()` (merge_and_unload), and for several
  adapters a PeftModel holding all of them, active together, weights set with set_scale;
- float64 truth: W0 + Σ wᵢ·ΔWᵢ recomputed here from the raw adapter and base tensors and
  adapter_config.json (`_read_peft_adapter`, `_reference_merge`), or the builders'
  `expected_delta` for kohya and diffusers files;
- raw bytes: unadapted tensors are compared as stored bytes, read by `_raw_file` (a
  20-line safetensors parser of its own, not the library's reader).

Every merge runs through the CLI (CliRunner), so the command users type is what is tested.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blas_rows import gemm_rows_invariant
from builders import PEFT_CASE_KINDS, VOCAB, DiffusersCase, KohyaCase, PeftCase
from cli_run import run_cli
from lora_tools.errors import LoraToolsError
from lora_tools.merge import merge

PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- helpers



def merge_ok(*args: object) -> None:
    code, out, err = run_cli("merge", *args, "--quiet")
    assert code == 0, err
    assert out == ""  # stdout carries data only, and merge has none


@dataclass
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]
    data: bytes


@dataclass
class RawFile:
    header: bytes  # the 8-byte length and the JSON header, as stored
    metadata: dict[str, str] | None
    tensors: dict[str, RawTensor]


def _raw_file(path: Path) -> RawFile:
    """A safetensors file parsed by hand: stored bytes per tensor, metadata, header."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    metadata = header.pop("__metadata__", None)
    start = 8 + n
    tensors = {
        name: RawTensor(e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]),
                        blob[start + e["data_offsets"][0] : start + e["data_offsets"][1]])
        for name, e in header.items()
    }
    return RawFile(blob[:start], metadata, tensors)


def _raw_model(folder_or_file: Path) -> dict[str, RawTensor]:
    """Every tensor of a model folder (single file or shards) or of one file."""
    path = Path(folder_or_file)
    if path.is_file():
        return _raw_file(path).tensors
    if (path / "model.safetensors").is_file():
        return _raw_file(path / "model.safetensors").tensors
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, RawTensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(_raw_file(path / shard).tensors)
    return tensors


def _load_model_tensors(folder_or_file: Path) -> dict[str, torch.Tensor]:
    path = Path(folder_or_file)
    if path.is_file():
        return load_file(path)
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(path / shard))
    return tensors


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to integers that count ulps: consecutive floats differ by 1."""
    if t.dtype == torch.float32:
        bits, mask = t.contiguous().view(torch.int32).to(torch.int64), 0x7FFFFFFF
    elif t.dtype in (torch.bfloat16, torch.float16):
        bits, mask = t.contiguous().view(torch.int16).to(torch.int64), 0x7FFF
    else:
        raise TypeError(t.dtype)
    return torch.where(bits < 0, -(bits & mask), bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: how many representable values of the (common) dtype lie between a and b."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return (ordered_bits(a) - ordered_bits(b)).abs()


def ulp_at(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |magnitude| (float64)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(magnitude.abs().clamp_min(info.tiny)))) * info.eps


def truth_error(value: torch.Tensor, truth: torch.Tensor, w0: torch.Tensor, dtype: torch.dtype) -> float:
    """max |value − truth| in units of what a correct merge stored in `dtype` may err by.

    That is one ulp of `dtype` at the operands' size, plus the float32 rounding of the
    product s·B·A that every merge (PEFT's, ours, on any device) computes first: a few
    float32 eps of |s|·|B|·|A|, bounded here by 4·eps·max|ΔW|.
    """
    delta = truth - w0
    magnitude = torch.maximum(torch.maximum(w0.abs(), delta.abs()), truth.abs())
    tolerance = ulp_at(magnitude, dtype) + 4 * torch.finfo(torch.float32).eps * float(delta.abs().max())
    return float(((value.double() - truth).abs() / tolerance).max())


def operand_ulps(value: torch.Tensor, other: torch.Tensor, w0: torch.Tensor, delta: torch.Tensor,
                 dtype: torch.dtype) -> float:
    """max |value − other| in ulps of `dtype` at the size of the operands, max(|W0|, |ΔW|, |W|).

    A merge that rounds the update to the stored dtype before adding (PEFT with bf16
    factors) errs by a fraction of ulp(ΔW), which near a cancellation (W0 ≈ −ΔW) is
    thousands of ulps of the tiny result: the operands set the scale there.
    """
    truth = w0 + delta
    magnitude = torch.maximum(torch.maximum(w0.abs(), delta.abs()), truth.abs())
    return float(((value.double() - other.double()).abs() / ulp_at(magnitude, dtype)).max())


# --------------------------------------------------------------------------- float64 truth

@dataclass
class RefLayer:
    """One adapted module as PEFT defines it, in float64, shaped like the base weight."""

    delta: torch.Tensor  # s·B·A (transposed for embeddings and fan_in_fan_out)
    transposed: bool
    magnitude: torch.Tensor | None = None
    bias_delta: torch.Tensor | None = None  # s·lora_B.bias


@dataclass
class RefAdapter:
    layers: dict[str, RefLayer]  # module path -> layer
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # base key -> whole replacement


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    # peft.utils.other.get_pattern_key: first key k with re.match(rf"(.*\.)?({k})$", module)
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_FACTOR = re.compile(r"^(?P<m>.+)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                     r"(?P<leaf>\.weight|\.bias)?$")


def _read_peft_adapter(adapter_dir: Path) -> RefAdapter:
    """A PEFT adapter folder read from its raw tensors and config, in float64."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    raw = {k.removeprefix(PEFT_PREFIX): v.to(torch.float64)
           for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _FACTOR.match(key)
        if match is None:  # modules_to_save copies and save_embedding_layers' base_layer copy
            full[key.replace(".base_layer.", ".")] = tensor
            continue
        role = match["role"] + (".bias" if match["leaf"] == ".bias" else "")
        modules.setdefault(match["m"], {})[role] = tensor
    layers = {}
    for module, parts in modules.items():
        embedding = "lora_embedding_A" in parts
        a = parts["lora_embedding_A" if embedding else "lora_A"]  # (r, in)
        b = parts["lora_embedding_B" if embedding else "lora_B"]  # (out, r)
        rank = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        delta = scale * (b @ a)
        bias = parts.get("lora_B.bias")
        layers[module] = RefLayer(delta.T if transposed else delta, transposed, parts.get("lora_magnitude_vector"),
                                  None if bias is None else scale * bias)
    return RefAdapter(layers, full)


def _reference_merge(base: dict[str, torch.Tensor], adapters: list[RefAdapter],
                     weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """W0 + Σ wᵢ·ΔWᵢ in float64, for the base tensors that change (the documented semantics).

    Replacements (modules_to_save) first; then each adapter in order. DoRA:
    W ← (m / ‖W0 + w·s·B·A‖)·(W + w·s·B·A), the norm per output feature (row of a
    Linear weight, column of a transposed one) of the *original* weight plus this
    adapter's update, as PEFT's merge computes it even with other adapters merged.
    """
    weights = weights or [1.0] * len(adapters)
    origin: dict[str, torch.Tensor] = {}
    for adapter in adapters:
        origin.update(adapter.full)
    current = dict(origin)
    for adapter, weight in zip(adapters, weights):
        for module, layer in adapter.layers.items():
            key = module + ".weight"
            w0 = origin.get(key, base[key].to(torch.float64))
            delta = weight * layer.delta
            merged = current.get(key, w0) + delta
            if layer.magnitude is not None:
                norm = torch.linalg.vector_norm(w0 + delta, dim=0 if layer.transposed else 1, keepdim=True)
                merged = (layer.magnitude.reshape(norm.shape) / norm) * merged
            current[key] = merged
            if layer.bias_delta is not None:
                bias_key = module + ".bias"
                current[bias_key] = current.get(bias_key, base[bias_key].to(torch.float64)) + weight * layer.bias_delta
    return current


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def merged_dir_factory(tmp_path_factory: pytest.TempPathFactory,
                       peft_case_factory: Callable[[str], PeftCase]) -> Callable[[str], Path]:
    """kind -> the folder `lora-tools merge BASE ADAPTER --device cpu` wrote (once per session)."""
    root = tmp_path_factory.mktemp("merged")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            case = peft_case_factory(kind)
            out = root / kind
            merge_ok(case.base_dir, case.adapter_dir, "-o", out, "--device", "cpu")
            done[kind] = out
        return done[kind]

    return get


@dataclass
class Truth:
    base: dict[str, torch.Tensor]  # stored dtype
    expected: dict[str, torch.Tensor]  # float64, only the tensors the adapter changes


@pytest.fixture(scope="session")
def truth_factory(peft_case_factory: Callable[[str], PeftCase]) -> Callable[[str], Truth]:
    cache: dict[str, Truth] = {}

    def get(kind: str) -> Truth:
        if kind not in cache:
            case = peft_case_factory(kind)
            base = _load_model_tensors(case.base_dir)
            cache[kind] = Truth(base, _reference_merge(base, [_read_peft_adapter(case.adapter_dir)]))
        return cache[kind]

    return get


# --------------------------------------------------------------------------- merge vs PEFT

def test_merge_matches_peft_and_is_as_close_to_the_truth(
    peft_case: PeftCase, merged_dir_factory: Callable[[str], Path], truth_factory: Callable[[str], Truth],
    record_property: Callable[[str, object], None],
) -> None:
    """Every tensor within 1 ulp of PEFT's merge_and_unload, at least as close as PEFT
    to the float64 truth, and every tensor the adapter does not touch byte-identical."""
    out = merged_dir_factory(peft_case.name)
    ours = _load_model_tensors(out)
    truth = truth_factory(peft_case.name)
    base_raw, ours_raw = _raw_model(peft_case.base_dir), _raw_model(out)

    # Same tensors, dtypes and shapes as the base.
    assert {k: (t.dtype, t.shape) for k, t in ours_raw.items()} == {k: (t.dtype, t.shape) for k, t in base_raw.items()}
    assert set(truth.expected) <= set(ours)
    assert truth.expected, "the reference found nothing to change"

    # The tensors nothing adapts: stored bytes identical.
    for name, raw in base_raw.items():
        if name not in truth.expected:
            assert ours_raw[name].data == raw.data, f"{name} is not adapted but changed"

    bf16 = peft_case.base_dtype == torch.bfloat16
    # bf16 factors: PEFT merges them as fp32 by default (autocast), or in bf16.
    peft_variants = [True, False] if bf16 else [True]
    identical = total = 0
    for autocast in peft_variants:
        peft = peft_case.peft_merged_state_dict(autocast_adapter_dtype=autocast)
        for name, expected in truth.expected.items():
            mine, theirs = ours[name], peft[name]
            w0 = truth.base[name].to(torch.float64)
            where = f"{name} (PEFT autocast_adapter_dtype={autocast})"
            assert mine.dtype == theirs.dtype == truth.base[name].dtype, where
            # The reference is right: PEFT agrees with it.
            assert truth_error(theirs, expected, w0, mine.dtype) <= 2.0, where
            if autocast:
                # PEFT rounds once in the stored dtype here too: the same bits, or 1 ulp.
                distance = ulp_distance(mine, theirs)
                assert int(distance.max()) <= 1, f"{where}: {int(distance.max())} ulps from PEFT"
                identical += int((distance == 0).sum())
                total += distance.numel()
            else:
                # PEFT rounds ΔW to bf16 first, then the sum: at most 1 ulp of the operands apart.
                assert operand_ulps(mine, theirs, w0, expected - w0, mine.dtype) <= 1.0, where
            ours_error = float((mine.double() - expected).abs().max())
            peft_error = float((theirs.double() - expected).abs().max())
            assert ours_error <= peft_error, f"{where}: ours {ours_error:.3g} vs PEFT {peft_error:.3g} from the truth"
    record_property("bit_identical_to_peft", f"{identical}/{total}")
    print(f"{peft_case.name}: {identical}/{total} adapted elements bit-identical to PEFT")
    assert total > 0


@pytest.mark.parametrize("kind", PEFT_CASE_KINDS)
def test_merged_folder_loads_and_logits_match_peft(
    kind: str, peft_case_factory: Callable[[str], PeftCase], merged_dir_factory: Callable[[str], Path]
) -> None:
    from transformers import AutoModelForCausalLM

    case = peft_case_factory(kind)
    out = merged_dir_factory(kind)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=case.base_dtype).eval()
    peft_model = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=case.base_dtype).eval()
    with torch.no_grad():
        logits = ours(tokens).logits
        for autocast in ([True, False] if case.base_dtype == torch.bfloat16 else [True]):
            peft_model.load_state_dict(case.peft_merged_state_dict(autocast_adapter_dtype=autocast))
            reference = peft_model(tokens).logits
            if case.base_dtype == torch.float32:
                torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
            else:
                # Weights 1 bf16 ulp apart, through two layers computed in bf16.
                spread = float(reference.abs().max())
                assert float((logits - reference).abs().max()) <= 0.03 * spread, autocast


# --------------------------------------------------------------------------- layout

def test_sharded_base_keeps_its_layout(
    llama_sharded_base_dir: Path, llama_plain_case: PeftCase, merged_dir_factory: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    base = llama_sharded_base_dir
    out = tmp_path / "merged"
    merge_ok(base, llama_plain_case.adapter_dir, "-o", out, "--device", "cpu")  # CPU: compared bit for bit below

    def files(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert files(out) == files(base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == index["weight_map"]
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name

    # The sharded base holds the llama tensors bit for bit: so must the merge.
    single = _raw_model(merged_dir_factory("llama_plain"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for shard in shards:
        ours, theirs = _raw_file(out / shard), _raw_file(base / shard)
        assert ours.metadata == theirs.metadata == {"format": "pt"}, shard
        assert ours.header == theirs.header, f"{shard}: header differs"
        for name, tensor in ours.tensors.items():
            assert tensor.data == single[name].data, f"{shard}: {name}"


def test_single_file_base_gives_one_file(kohya_case: KohyaCase, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    merge_ok(kohya_case.base_file, kohya_case.lora_file, "-o", out)
    assert out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]  # no leftovers
    ours, base = _raw_file(out), _raw_file(kohya_case.base_file)
    assert ours.metadata == base.metadata
    assert list(ours.tensors) == list(base.tensors)


# --------------------------------------------------------------------------- several adapters

def _peft_multi_merge(base_dir: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """PEFT itself merging several adapters at once: all active, weights via set_scale."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    names = [f"a{i}" for i in range(len(adapters))]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                module.set_scale(name, weight)  # scaling = w · alpha / r (or / √r)
    merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _check_against(ours: dict[str, torch.Tensor], base: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   peft: dict[str, torch.Tensor] | None, max_peft_ulps: float) -> None:
    for name, truth in expected.items():
        mine = ours[name]
        w0 = base[name].to(torch.float64)
        # Accumulated in fp32, rounded once.
        assert truth_error(mine, truth, w0, torch.float32) <= 1.0, name
        if peft is not None:
            assert truth_error(peft[name], truth, w0, torch.float32) <= 2.0, f"{name}: the reference disagrees with PEFT"
            distance = operand_ulps(mine, peft[name], w0, truth - w0, torch.float32)
            print(f"{name}: {distance:.3f} ulps from PEFT, {int((ulp_distance(mine, peft[name]) == 0).sum())}"
                  f"/{mine.numel()} bit-identical")
            assert distance <= max_peft_ulps, name
            assert float((mine.double() - truth).abs().max()) <= float((peft[name].double() - truth).abs().max()), name
    for name, tensor in base.items():
        if name not in expected:
            assert torch.equal(ours[name], tensor), name


def test_two_weighted_adapters_match_float64_and_peft(
    peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    plain, rslora = peft_case_factory("llama_plain"), peft_case_factory("llama_rslora")
    weights = [0.7, -0.3]
    out = tmp_path / "merged"
    merge_ok(plain.base_dir, plain.adapter_dir, rslora.adapter_dir, "--weight", 0.7, "--weight", -0.3, "-o", out,
             "--device", "cpu")  # PEFT merges on the CPU: same device, so ulp for ulp
    base = _load_model_tensors(plain.base_dir)
    expected = _reference_merge(base, [_read_peft_adapter(plain.adapter_dir), _read_peft_adapter(rslora.adapter_dir)],
                                weights)
    peft = _peft_multi_merge(plain.base_dir, [plain.adapter_dir, rslora.adapter_dir], weights)
    _check_against(_load_model_tensors(out), base, expected, peft, max_peft_ulps=1)


@pytest.mark.parametrize("order", ["dora_last", "dora_first"])
def test_dora_among_several_adapters(
    order: str, peft_case_factory: Callable[[str], PeftCase], tmp_path: Path
) -> None:
    """DoRA next to other adapters, semantics as PEFT's merge (peft 0.21) defines them.

    Adapters are folded in the order given, each with its weight w multiplying its
    scaling (set_scale). A DoRA layer maps the weight so far W to
    (m / ‖W0 + w·s·B·A‖)·(W + w·s·B·A): the norm is taken of the *unmerged* base
    weight plus its own update (PEFT unmerges the earlier adapters to compute it), and
    the factor then scales everything merged so far. PEFT expresses exactly this with
    both adapters active, so it is the oracle, next to the float64 reference.
    """
    plain, dora = peft_case_factory("llama_plain"), peft_case_factory("llama_dora")
    cases = [(plain.adapter_dir, 0.5), (dora.adapter_dir, 1.5)]
    if order == "dora_first":
        cases.reverse()
    adapters, weights = [c[0] for c in cases], [c[1] for c in cases]
    out = tmp_path / "merged"
    merge_ok(plain.base_dir, *adapters, *[x for w in weights for x in ("--weight", w)], "-o", out, "--device", "cpu")
    base = _load_model_tensors(plain.base_dir)
    expected = _reference_merge(base, [_read_peft_adapter(a) for a in adapters], weights)
    peft = _peft_multi_merge(plain.base_dir, adapters, weights)
    # PEFT recovers W0 as (W0 + ΔW_plain) − ΔW_plain in fp32 before taking DoRA's norm,
    # and the factor m/‖·‖ multiplies an already rounded sum: PEFT and we may sit a few
    # ulps apart (3 seen), while both stay within tolerance of the float64 truth and
    # ours is no further from it than PEFT's.
    _check_against(_load_model_tensors(out), base, expected, peft, max_peft_ulps=4)


# --------------------------------------------------------------------------- kohya, diffusers

def _check_expected_deltas(out: Path, base_file: Path, deltas: dict[str, torch.Tensor]) -> None:
    ours, base = load_file(out), load_file(base_file)
    ours_raw, base_raw = _raw_file(out).tensors, _raw_file(base_file).tensors
    assert set(ours) == set(base)
    for name, tensor in base.items():
        if name in deltas:
            w0 = tensor.to(torch.float64)
            truth = w0 + deltas[name]
            assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
            assert truth_error(ours[name], truth, w0, tensor.dtype) <= 1.0, name
            assert not torch.equal(ours[name], tensor), f"{name}: not applied"
        else:
            assert ours_raw[name].data == base_raw[name].data, f"{name} is not adapted but changed"


def test_kohya_merge_into_single_file_unet(kohya_case: KohyaCase, tmp_path: Path) -> None:
    """Linear, 1×1 conv (proj_in), 3×3 LoCon conv (conv1) and a text-encoder layer."""
    out = tmp_path / "merged.safetensors"
    merge_ok(kohya_case.base_file, kohya_case.lora_file, "-o", out)
    deltas = {k: torch.from_numpy(v) for k, v in kohya_case.expected_delta.items()}
    assert {"down_blocks.0.attentions.0.proj_in.weight", "down_blocks.0.resnets.0.conv1.weight",
            "text_model.encoder.layers.0.self_attn.q_proj.weight"} <= set(deltas)
    _check_expected_deltas(out, kohya_case.base_file, deltas)


def test_diffusers_merge_into_single_file_unet(diffusers_case: DiffusersCase, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    merge_ok(diffusers_case.base_file, diffusers_case.lora_file, "-o", out)
    deltas = {f"{k}.weight": torch.from_numpy(v) for k, v in diffusers_case.expected_delta.items()}
    _check_expected_deltas(out, diffusers_case.base_file, deltas)


# --------------------------------------------------------------------------- dtype and device

def test_dtype_bf16_on_fp32_base(
    llama_plain_case: PeftCase, merged_dir_factory: Callable[[str], Path], truth_factory: Callable[[str], Truth],
    tmp_path: Path,
) -> None:
    """Every float tensor stored bf16; adapted ones are the fp32 merge rounded (once) to bf16."""
    out = tmp_path / "merged"
    merge_ok(llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out, "--dtype", "bf16", "--device", "cpu")
    raw = _raw_model(out)
    assert {t.dtype for t in raw.values()} == {"BF16"}
    ours = _load_model_tensors(out)
    fp32 = _load_model_tensors(merged_dir_factory("llama_plain"))
    base = _load_model_tensors(llama_plain_case.base_dir)
    adapted = truth_factory("llama_plain").expected
    for name, tensor in ours.items():
        source = fp32[name] if name in adapted else base[name]
        assert torch.equal(tensor, source.to(torch.bfloat16)), name


def test_dtype_bf16_on_sharded_base_rewrites_index_size(llama_sharded_base_dir: Path, llama_plain_case: PeftCase,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge_ok(llama_sharded_base_dir, llama_plain_case.adapter_dir, "-o", out, "--dtype", "bf16")
    index = json.loads((llama_sharded_base_dir / "model.safetensors.index.json").read_text())
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    raw = _raw_model(out)
    assert {t.dtype for t in raw.values()} == {"BF16"}
    # total_size is the bytes of the tensors (what transformers writes), not of the files.
    assert new_index["metadata"]["total_size"] == sum(len(t.data) for t in raw.values())
    assert new_index["metadata"]["total_size"] == index["metadata"]["total_size"] // 2
    for key, value in index["metadata"].items():
        if key != "total_size":
            assert new_index["metadata"][key] == value, key


def test_device_cpu_and_auto_write_the_same_bytes(
    llama_plain_case: PeftCase, merged_dir_factory: Callable[[str], Path], tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto means CUDA here; tests/test_cuda.py covers it")
    out = tmp_path / "merged"
    merge_ok(llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out, "--device", "auto")
    assert (out / "model.safetensors").read_bytes() == (merged_dir_factory("llama_plain") / "model.safetensors").read_bytes()


def test_device_cuda_without_gpu_is_a_usage_error(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out,
                                   "--device", "cuda", "--quiet")
    assert code == 2
    assert stdout == ""
    assert stderr.splitlines() == ["Error: device 'cuda' requested but CUDA is not available"]
    assert not out.exists()


def test_float64_base_is_merged_in_float64(
    llama_plain_case: PeftCase, truth_factory: Callable[[str], Truth], tmp_path: Path
) -> None:
    """'Accumulate in fp32' is for narrower dtypes: an F64 weight keeps its 53 bits."""
    from safetensors.torch import save_file

    base = tmp_path / "base64"
    base.mkdir()
    (base / "config.json").write_bytes((llama_plain_case.base_dir / "config.json").read_bytes())
    truth = truth_factory("llama_plain")
    save_file({k: v.double() for k, v in truth.base.items()}, base / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    merge_ok(base, llama_plain_case.adapter_dir, "-o", out)
    ours = _load_model_tensors(out)
    for name, expected in truth.expected.items():
        assert ours[name].dtype == torch.float64
        # float32 arithmetic would be ~1e-8 off; float64 is ~1e-17.
        assert float((ours[name] - expected).abs().max()) <= 1e-14 * float(expected.abs().max()), name
    code, _, err = run_cli("verify", base, llama_plain_case.adapter_dir, out)
    assert code == 0, err


def test_dtype_change_updates_config_dtype(llama_plain_case, tmp_path) -> None:
    """A bf16 merge of an fp32 base must not claim float32 in config.json."""
    out = tmp_path / "bf16"
    merge(llama_plain_case.base_dir, [llama_plain_case.adapter_dir], out, dtype="bf16", device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert "bfloat16" in {config.get("torch_dtype"), config.get("dtype")}
    assert load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_adapter_with_tensors_not_understood_is_refused(llama_plain_case, tmp_path) -> None:
    """Merging the LoRA part of an adapter and silently dropping the rest would be wrong."""
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(llama_plain_case.adapter_dir, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_w1_a"] = torch.ones(64, 4)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(LoraToolsError, match="not understood"):
        merge(llama_plain_case.base_dir, [adapter], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["llama_plain", "llama_bf16", "llama_rslora"])
def test_row_blocked_merge_is_bit_identical_to_peft(kind, peft_case_factory, monkeypatch, tmp_path) -> None:
    """The CPU hot path merges in row blocks; small blocks (20 rows of the 64-wide
    weights: 20, 20 and a last one of 24 that took the 4-row tail, which MKL would round
    otherwise; the fewest rows, 16, of the 128-wide) must give PEFT's bytes exactly, as
    whole tensors do."""
    import lora_tools.merge as merge_module

    case = peft_case_factory(kind)
    monkeypatch.setattr(merge_module, "CPU_CHUNK_ELEMENTS", 20 * 64)
    merge(case.base_dir, [case.adapter_dir], tmp_path / "out", device="cpu")
    ours = _load_model_tensors(tmp_path / "out")
    peft = case.peft_merged_state_dict()
    adapted = [k for k in ours if "proj" in k]
    assert adapted
    if not gemm_rows_invariant():  # this BLAS rounds even such blocks otherwise (tests/blas_rows.py):
        from lora_tools.verify.operation import verify  # hold each element to verify's rounding bound instead

        report = verify(case.base_dir, [case.adapter_dir], tmp_path / "out")
        assert report.equivalent and {t.verdict for t in report.tensors} == {"ok"}, report
        return
    for name in adapted:
        assert torch.equal(ours[name], peft[name].to(ours[name].dtype)), name


@pytest.mark.parametrize("dtype", ["keep", "bf16"])
def test_cuda_staging_logic_on_the_cpu(
    llama_sharded_base_dir: Path, llama_plain_case: PeftCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The GPU path's chunked staging (two buffers each way, reused while copies are in
    flight, a tensor spread over many chunks) run on the CPU with no-op events: it must
    write exactly the bytes of the CPU path, also with --dtype, whose conversions of
    unadapted tensors go through the same chunks. CI has no GPU; tests/test_cuda.py
    runs the real thing where there is one."""
    import contextlib

    import torch

    import lora_tools.engine.stream as stream_module
    from lora_tools.engine import staging

    class Event:  # CPU copies are synchronous: nothing to wait for
        def record(self) -> None: ...

        def synchronize(self) -> None: ...

    adapter = [llama_plain_case.adapter_dir]
    merge(llama_sharded_base_dir, adapter, tmp_path / "host", device="cpu", dtype=dtype)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(stream_module, "staging_for", lambda device, *_: staging.CudaStaging(device, chunk_bytes=64))
    loads = []
    real_load = staging.CudaStaging.load
    monkeypatch.setattr(staging.CudaStaging, "load", lambda self, src, name, reuse=True: loads.append(name) or real_load(self, src, name, reuse))
    merge(llama_sharded_base_dir, adapter, tmp_path / "chunked", device="cpu", dtype=dtype)
    if dtype != "keep":  # every tensor is converted, and came through the staging
        assert "model.embed_tokens.weight" in loads
    shards = sorted(p.name for p in (tmp_path / "host").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:
        assert (tmp_path / "chunked" / name).read_bytes() == (tmp_path / "host" / name).read_bytes(), name


@pytest.mark.parametrize("kind", ["llama_bf16", "llama_dora", "llama_lora_bias", "llama_modules_to_save", "llama_embedding", "gpt2_conv1d"])
def test_merge_plan_holds_factors_as_stored_on_the_device(kind, peft_case_factory) -> None:
    """merge loads every factor straight into a torch tensor on its compute device, in the
    dtype the file stores (so a GPU merge never holds the adapter in host memory, and a
    CPU one holds bf16 at half the size); the values must be the file's exactly."""
    import numpy as np

    from lora_tools.engine.placement import factors_on
    from lora_tools.engine.plan import make_plan
    from lora_tools.io.dtypes import torch_dtype

    case = peft_case_factory(kind)
    plan = make_plan(case.base_dir, [case.adapter_dir], place=factors_on(torch.device("cpu")))
    reference = make_plan(case.base_dir, [case.adapter_dir])
    try:
        held = []
        for layer, ref in zip(plan.adapters[0].layers, reference.adapters[0].layers, strict=True):
            for factor, ref_factor in [(layer.a, ref.a), (layer.b, ref.b), (layer.magnitude, ref.magnitude), (layer.bias, ref.bias)]:
                if ref_factor is not None:
                    held.append((factor, ref_factor, layer.dtype))
        for key, tensor in plan.adapters[0].full_tensors.items():
            held.append((tensor, reference.adapters[0].full_tensors[key], plan.adapters[0].full_tensor_dtypes[key]))
        assert held
        for factor, ref_factor, code in held:
            assert isinstance(factor, torch.Tensor)
            assert isinstance(ref_factor, np.ndarray)
            assert factor.dtype == torch_dtype(code) and factor.device.type == "cpu"
            assert np.array_equal(factor.to(torch.float64).numpy(), ref_factor.astype(np.float64))
        if kind == "llama_bf16":
            assert {factor.dtype for factor, _, _ in held} == {torch.bfloat16}
    finally:
        plan.close()
        reference.close()


@pytest.mark.parametrize("kind", ["llama_bf16", "llama_dora"])
def test_legacy_bin_adapter_merges_like_safetensors(kind, peft_case_factory, tmp_path: Path) -> None:
    """An adapter_model.bin (torch.load, weights_only) goes through the same loading as
    safetensors, factors placed as stored: the merged files are byte for byte the same."""
    case = peft_case_factory(kind)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(case.adapter_dir / "adapter_config.json", legacy)
    torch.save(load_file(case.adapter_file), legacy / "adapter_model.bin")
    merge(case.base_dir, [case.adapter_dir], tmp_path / "from-safetensors", device="cpu")
    merge(case.base_dir, [legacy], tmp_path / "from-bin", device="cpu")
    shards = sorted(p.name for p in (tmp_path / "from-safetensors").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "from-bin" / name).read_bytes() == (tmp_path / "from-safetensors" / name).read_bytes(), name
