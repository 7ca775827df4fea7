"""QLoRA bases (issue #18): bitsandbytes' NF4 round trip, `inspect --base-quant`, and the
merge onto deq(NF4(W0)).

`linalg.nf4` is checked three ways: bit for bit against bitsandbytes itself when it is
installed (its `quantize_4bit`/`dequantize_4bit`, and `Params4bit` as transformers uses it),
against a float64 reference written here from the definition (nearest code value, ties to
the lower one, absmax per block), and on hand-made ties. The inspect figures are compared
with ‖W0 − deq(NF4(W0))‖_F / ‖s·B·A‖_F computed here from the raw tensors.

bitsandbytes on CPU has two native kernels that depart from its own PyTorch reference
kernels (and from CUDA), so the exact comparisons route those two ops to the reference
(`_bnb_reference_kernels`): the 8-bit blockwise quantizer of double quantization (a
65 536-bin lookup table, ~0.15 % of codes off the nearest value) and, on AVX-512, the
4-bit dequantizer when a row's length is not a multiple of the blocksize (it indexes
absmax per row). `test_bitsandbytes_native_cpu_kernels` compares with the unrouted public
API where those kernels are exact.
"""

from __future__ import annotations

import importlib.util
import inspect as pyinspect
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from builders import PeftCase
from cli_run import run_cli
from lora_tools.adapter import LoraLayer
from lora_tools.errors import RequestError
from lora_tools.inspect import inspect_adapter
from lora_tools.linalg import nf4
from lora_tools.linalg.nf4 import BaseQuant, nf4_round_trip, parse_base_quant, round_trip_error, round_trip_stored

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None

# The NF4 code book as bitsandbytes writes it (functional.get_4bit_type), stored float32.
CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32).astype(np.float64)
# A value this close to a midpoint (relative to its size) may round either way between
# float32 arithmetic (x·(1/absmax), a few ulps) and float64.
NEAR_TIE = 1e-6


def _dynamic_map64() -> np.ndarray:
    """create_dynamic_map() from its definition, in float64: for each decade 10^(i-6),
    i = 0…6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1), both signs; then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += [*means, *(-means)]
    return np.sort(np.array(values))


def _nearest(scaled: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest code value (exact ties: the lower, argmin's first), and whether
    the second nearest is as near up to NEAR_TIE·|value| (where float32 arithmetic may
    choose it)."""
    distance = np.abs(scaled[..., None] - code)
    q = np.argmin(distance, axis=-1)
    two = np.sort(distance, axis=-1)[..., :2]
    return q, (two[..., 1] - two[..., 0]) < NEAR_TIE * np.abs(scaled)


def reference_nf4(w: torch.Tensor, blocksize: int, absmax_of=None) -> tuple[torch.Tensor, np.ndarray]:
    """deq(NF4(w)) from the definition, in float64: blocks of `blocksize` over w row-major
    (the last one shorter), absmax per block, the nearest code value, code·absmax rounded to
    float32 and then to w's dtype. `absmax_of(absmax) -> absmax` replaces the scales used to
    dequantize (double quantization). Also the mask of values too near a midpoint to call."""
    x = w.detach().to(torch.float64).flatten().numpy()
    starts = range(0, x.size, blocksize)
    absmax = np.array([np.abs(x[s:s + blocksize]).max() for s in starts])
    scales = absmax if absmax_of is None else absmax_of(absmax)
    out, near = np.empty_like(x), np.zeros(x.size, dtype=bool)
    for k, s in enumerate(starts):
        block = x[s:s + blocksize]
        scaled = block / absmax[k] if absmax[k] > 0 else np.zeros_like(block)
        q, near[s:s + blocksize] = _nearest(scaled, CODE)
        out[s:s + blocksize] = CODE[q] * scales[k]  # exact in float64: 24-bit × 24-bit
    return torch.from_numpy(out.astype(np.float32)).to(w.dtype).reshape(w.shape), near.reshape(w.shape)


def reference_double_quant(absmax: np.ndarray, near_out: list[bool] | None = None) -> np.ndarray:
    """The absmax values as double quantization gives them back, from the definition:
    offset = their mean (float32), absmax − offset (float32) in blocks of 256, each to the
    nearest value of the dynamic map times the block's own absmax, then code·absmax2 +
    offset, each step rounded to float32 as bitsandbytes computes it. The mean here is
    float64's rounded once, bitsandbytes' is torch's float32 sum: they may differ by an ulp
    unless the sum is exact. `near_out` collects the near-tie mask of the codes."""
    dyn = _dynamic_map64().astype(np.float32).astype(np.float64)
    offset = np.float64(np.float32(absmax.mean()))
    values = np.float32(absmax - offset).astype(np.float64)
    out = np.empty_like(absmax)
    for s in range(0, values.size, 256):
        block = values[s:s + 256]
        absmax2 = np.abs(block).max()
        q, near = _nearest(block / absmax2 if absmax2 > 0 else block, dyn)
        if near_out is not None:
            near_out.extend(near)
        out[s:s + 256] = np.float32(np.float32(dyn[q] * absmax2) + offset)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return a.numel() == 0 or torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --------------------------------------------------------------------------- bitsandbytes


@contextmanager
def _bnb_reference_kernels() -> Iterator[None]:
    """bitsandbytes' 8-bit blockwise quantizer and 4-bit dequantizer run through its own
    PyTorch reference kernels ("default", CompositeExplicitAutograd) instead of the native
    CPU library, eagerly (not through torch.compile: same arithmetic, no compile time)."""
    from bitsandbytes.backends.default import ops as default_ops

    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    saved = []
    for name in ("quantize_blockwise", "dequantize_4bit"):
        packet = getattr(torch.ops.bitsandbytes, name)
        saved.append((packet, packet.default))
        packet.default = (lambda op: lambda *args: op.redispatch(keys, *args))(packet.default)
    compiled = [(fn, getattr(default_ops, fn)) for fn in ("_dequantize_4bit_compute", "_dequantize_blockwise_compute")]
    for fn, wrapper in compiled:
        setattr(default_ops, fn, getattr(wrapper, "__wrapped__", wrapper))
    try:
        yield
    finally:
        for packet, op in saved:
            packet.default = op
        for fn, wrapper in compiled:
            setattr(default_ops, fn, wrapper)


def bnb_round_trip(w: torch.Tensor, spec: BaseQuant, *, reference_kernels: bool = True) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(w, nf4, blocksize, compress_statistics=dq)) by bitsandbytes."""
    import bitsandbytes.functional as F

    with _bnb_reference_kernels() if reference_kernels else _nothing():
        packed, state = F.quantize_4bit(w, blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type="nf4")
        return F.dequantize_4bit(packed, state)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _bnb() -> object:
    return pytest.importorskip("bitsandbytes")


SHAPES = [(128, 64), (33, 7), (300, 96), (64 * 300 + 17,), (5,), (2, 3, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec", [BaseQuant(), BaseQuant(double_quant=True), BaseQuant(True, 32), BaseQuant(False, 256)],
                         ids=str)
def test_matches_bitsandbytes_bit_for_bit(dtype: torch.dtype, spec: BaseQuant) -> None:
    """Every shape (tail blocks, rows shorter than a block, odd sizes, > 256 absmax values
    so double quantization has a tail block too), every dtype bitsandbytes quantizes."""
    _bnb()
    g = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        w = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        w.view(-1)[::97] *= 40  # outliers set the absmax of some blocks
        ours, theirs = nf4_round_trip(w, spec), bnb_round_trip(w, spec)
        assert same_bits(ours, theirs), (shape, int((ours != theirs).sum()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitsandbytes_native_cpu_kernels(dtype: torch.dtype) -> None:
    """The public API as a CPU user runs it (native kernels): exact without double
    quantization when rows hold whole blocks, as every transformer weight does."""
    _bnb()
    g = torch.Generator().manual_seed(8)
    for shape, blocksize in [((256, 128), 64), ((96, 64), 64), ((64, 256), 128), ((16, 63), 64)]:
        w = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        spec = BaseQuant(blocksize=blocksize)
        assert same_bits(nf4_round_trip(w, spec), bnb_round_trip(w, spec, reference_kernels=False)), shape


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_params4bit(dtype: torch.dtype, double_quant: bool) -> None:
    """What a QLoRA run holds: bitsandbytes' Params4bit quantizing a weight from its load
    dtype (compress_statistics defaults to True there), dequantized as its forward does."""
    bnb = _bnb()
    import bitsandbytes.functional as F

    w = (0.03 * torch.randn(192, 128, generator=torch.Generator().manual_seed(9))).to(dtype)
    with _bnb_reference_kernels():
        param = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
        param = param.to("cpu")
        assert param.bnb_quantized and param.quant_state.dtype == dtype
        theirs = F.dequantize_4bit(param.data, param.quant_state)
    assert same_bits(nf4_round_trip(w, BaseQuant(double_quant=double_quant)), theirs)


def test_dynamic_map_is_bitsandbytes() -> None:
    values = np.array(nf4.dynamic_map())
    assert values.size == 256 and np.all(np.diff(values) > 0) and values[-1] == 1.0
    assert values[0] == np.float32(-0.99296875)
    np.testing.assert_allclose(values, _dynamic_map64(), rtol=1e-6, atol=0)
    bnb = pytest.importorskip("bitsandbytes")
    assert same_bits(torch.tensor(values, dtype=torch.float32), bnb.functional.create_dynamic_map())


# --------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128])
def test_matches_float64_definition(dtype: torch.dtype, blocksize: int) -> None:
    g = torch.Generator().manual_seed(11)
    for shape in [(96, 64), (50, 30), (7,)]:
        w = (0.05 * torch.randn(shape, generator=g)).to(dtype)
        reference, near = reference_nf4(w, blocksize)
        ours = nf4_round_trip(w, BaseQuant(blocksize=blocksize))
        assert near.sum() <= 2, shape  # random data: a value within 1e-6 of a midpoint is rare
        assert same_bits(ours[~torch.from_numpy(near)], reference[~torch.from_numpy(near)]), shape


def test_double_quant_matches_float64_definition() -> None:
    """Block absmax values 2 ± k/64 in symmetric pairs, so the float32 mean (the offset) is
    exact and the float64 reference can use it: 300 blocks, one full 256-value absmax block
    and a tail of 44. Dequantized absmax: code8[q]·absmax2 + offset, rounded as float32."""
    g = torch.Generator().manual_seed(12)
    half = torch.randint(0, 64, (150,), generator=g).double() / 64
    targets = torch.cat([2 + half, 2 - half])[torch.randperm(300, generator=g)]
    w = torch.rand(300, 64, generator=g, dtype=torch.float64) * 1.8 - 0.9  # |w| < 0.9 ≤ any target
    w *= targets[:, None]
    w[torch.arange(300), torch.randint(0, 64, (300,), generator=g)] = targets * torch.where(torch.rand(300, generator=g) < 0.5, -1.0, 1.0)
    w = w.float()
    chosen: list[bool] = []

    def double_quantized(absmax: np.ndarray) -> np.ndarray:
        assert absmax.mean() == 2.0
        return reference_double_quant(absmax, chosen)

    reference, near = reference_nf4(w, 64, double_quantized)
    assert len(chosen) == 300 and not any(chosen) and not near.any()
    ours = nf4_round_trip(w, BaseQuant(double_quant=True))
    # The map's values here are float64 formula values rounded once; bitsandbytes' own
    # are float32 arithmetic: the same to a few float32 ulps, not always to the bit.
    torch.testing.assert_close(ours, reference, rtol=4e-7, atol=0)
    assert not same_bits(ours, nf4_round_trip(w, BaseQuant())), "double quantization changed nothing"


def test_ties_go_to_the_lower_code() -> None:
    """A value exactly on the float32 midpoint of two codes takes the lower one; the next
    float32 above it takes the upper one. absmax = 2, so scaling by 1/absmax is exact."""
    code32 = CODE.astype(np.float32)
    midpoints = (code32[:-1] + code32[1:]) / np.float32(2)  # float32 arithmetic, as bitsandbytes
    above = np.nextafter(midpoints, np.float32(2))
    values = np.concatenate([[2.0], 2 * midpoints, 2 * above]).astype(np.float32)
    w = torch.from_numpy(np.pad(values, (0, 64 - values.size)))
    out = nf4_round_trip(w, BaseQuant()).numpy()
    np.testing.assert_array_equal(out[1:16], (2 * code32[:-1]).astype(np.float32))
    np.testing.assert_array_equal(out[16:31], (2 * code32[1:]).astype(np.float32))


def test_blocks_and_edge_cases() -> None:
    w = torch.zeros(130)
    w[:64] = 1.0
    w[64:128] = torch.linspace(-3, 3, 64)
    w[128:] = torch.tensor([0.5, -0.25])  # the tail block: its own absmax
    out = nf4_round_trip(w, BaseQuant())
    assert torch.equal(out[:64], torch.ones(64))
    assert out[64] == -3 and out[127] == 3
    assert torch.equal(out[128:], torch.tensor([0.5, -0.5 * 0.5250730514526367], dtype=torch.float32))
    assert torch.equal(nf4_round_trip(torch.zeros(100), BaseQuant(double_quant=True)), torch.zeros(100))
    assert nf4_round_trip(torch.zeros(0, 4), BaseQuant()).shape == (0, 4)
    with pytest.raises(RequestError, match="float32, bfloat16 and float16"):
        nf4_round_trip(torch.zeros(64, dtype=torch.float64), BaseQuant())
    # A Conv1D weight stored (in, out) is quantized as transformers hands it over: (out, in).
    conv1d = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    stored = round_trip_stored(conv1d, BaseQuant(), transposed=True)
    assert stored.is_contiguous() and torch.equal(stored, nf4_round_trip(conv1d.T.contiguous(), BaseQuant()).T)
    assert not torch.equal(stored, nf4_round_trip(conv1d, BaseQuant()))
    # The error norm is that of the round trip, in float64.
    w = torch.randn(70, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    expected = float((w.double() - nf4_round_trip(w, BaseQuant()).double()).norm())
    assert round_trip_error(w, BaseQuant()) == pytest.approx(expected, rel=1e-12)


def test_large_tensor_is_chunked_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(40, 1000, generator=torch.Generator().manual_seed(5))
    whole = nf4_round_trip(w, BaseQuant(double_quant=True))
    monkeypatch.setattr(nf4, "_CHUNK", 256)
    assert same_bits(nf4_round_trip(w, BaseQuant(double_quant=True)), whole)
    assert round_trip_error(w, BaseQuant(double_quant=True)) == pytest.approx(float((w.double() - whole.double()).norm()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    for spec in (BaseQuant(), BaseQuant(blocksize=128)):
        assert same_bits(nf4_round_trip(w.cuda(), spec).cpu(), nf4_round_trip(w, spec))
    # Double quantization's offset is torch's float32 mean on the device: the sum order may
    # differ from the CPU's, so compare to a few ulps of bf16 only.
    torch.testing.assert_close(nf4_round_trip(w.cuda(), BaseQuant(True)).cpu(), nf4_round_trip(w, BaseQuant(True)))


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("text, spec", [
    ("nf4", BaseQuant()),
    ("nf4,dq", BaseQuant(double_quant=True)),
    (" NF4 , DQ ", BaseQuant(double_quant=True)),
    ("nf4,dq,blocksize=64", BaseQuant(double_quant=True)),
    ("nf4,blocksize=128,dq", BaseQuant(double_quant=True, blocksize=128)),
    ("nf4,blocksize=4096", BaseQuant(blocksize=4096)),
])
def test_parse_base_quant(text: str, spec: BaseQuant) -> None:
    assert parse_base_quant(text) == spec
    assert parse_base_quant(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "fp4", "nf4,fp4", "dq", "dq,nf4", "nf4,dq,dq", "nf4,blocksize=48", "nf4,blocksize=",
                                  "nf4,blocksize=64,blocksize=64", "nf4;dq", "nf4,", "int4"])
def test_parse_base_quant_refuses(text: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_base_quant(text)
    message = str(caught.value)
    assert "\n" not in message and repr(text) in message and "nf4,dq" in message


def test_which_layers_bitsandbytes_quantizes() -> None:
    a, b = np.zeros((4, 64), np.float32), np.zeros((32, 4), np.float32)
    layer = LoraLayer("model.layers.0.self_attn.q_proj", a, b, 8.0)
    assert nf4.quantized_by_bitsandbytes(layer, (32, 64))
    assert not nf4.quantized_by_bitsandbytes(LoraLayer("lm_head", a, b, 8.0), (32, 64))
    assert not nf4.quantized_by_bitsandbytes(LoraLayer("model.embed_tokens", a, b, 8.0, kind="embedding"), (64, 32))
    assert not nf4.quantized_by_bitsandbytes(layer, (32, 16, 2, 2))  # a conv weight, flattened factors


# --------------------------------------------------------------------------- inspect --base-quant


def _stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _lora_updates(case: PeftCase, alpha: float | None) -> dict[str, torch.Tensor]:
    """module path -> s·B·A in float64, shaped (out, in), from the adapter file."""
    raw = load_file(case.adapter_file)
    config = case.adapter_config
    updates = {}
    for key, a in raw.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = raw[key.replace(".lora_A.", ".lora_B.")]
        scale = (config["lora_alpha"] if alpha is None else alpha) / a.shape[0]
        updates[module] = scale * (b.double() @ a.double())
    return updates


def _deq(w: torch.Tensor, spec: BaseQuant) -> torch.Tensor:
    """deq(NF4(w)) by bitsandbytes when it is installed, else by the float64 reference."""
    if not HAVE_BNB:
        reference, near = reference_nf4(w, spec.blocksize, reference_double_quant if spec.double_quant else None)
        assert not near.any()
        return reference
    return bnb_round_trip(w, spec)


def _exact(spec: BaseQuant) -> bool:
    """Whether `_deq` is bit-exact: without bitsandbytes, double quantization's offset is a
    float64 mean, maybe an ulp from torch's float32 one (then some absmax values too)."""
    return HAVE_BNB or not spec.double_quant


def expected_mismatch(case: PeftCase, spec: BaseQuant, alpha: float | None = None) -> dict[str, float]:
    """‖W0 − deq(NF4(W0))‖_F / ‖s·B·A‖_F per adapted Linear, in float64, from the raw files;
    a Conv1D weight (stored (in, out)) quantized as (out, in)."""
    base = _stored_tensors(case.base_dir)
    conv1d = bool(case.adapter_config.get("fan_in_fan_out"))
    out = {}
    for module, delta in _lora_updates(case, alpha).items():
        w = base[module + ".weight"]
        oriented = w.T.contiguous() if conv1d else w
        assert oriented.shape == delta.shape
        error = float((oriented.double() - _deq(oriented, spec).double()).norm())
        out[module] = error / float(delta.norm())
    return out


@pytest.mark.parametrize("kind, spec, alpha", [
    ("llama_plain", "nf4,dq", 0.2),  # scale 0.05: some layers above 1, some below
    ("llama_plain", "nf4", None),
    ("llama_bf16", "nf4,dq", 0.2),
    ("gpt2_conv1d", "nf4,blocksize=128", 0.2),
])
def test_inspect_mismatch_ratio(peft_case_factory, kind: str, spec: str, alpha: float | None) -> None:
    case = peft_case_factory(kind)
    parsed = parse_base_quant(spec)
    expected = expected_mismatch(case, parsed, alpha)
    report = inspect_adapter(case.adapter_dir, base_path=case.base_dir, alpha=alpha, base_quant=spec)
    assert {layer.name for layer in report.layers} == set(expected)
    rel = 1e-9 if _exact(parsed) else 1e-5
    for layer in report.layers:
        assert layer.base_quant_mismatch == pytest.approx(expected[layer.name], rel=rel), layer.name
        assert layer.base_quant_error == pytest.approx(expected[layer.name] * layer.fro_norm, rel=rel)
        assert ("quant_mismatch" in layer.flags) == (expected[layer.name] > 1), layer.name
    summary = report.base_quant
    assert summary is not None and summary.spec == str(parsed) and summary.quantized_layers == len(expected)
    worst = max(expected, key=expected.__getitem__)
    assert summary.worst_layer == worst and summary.max_mismatch == pytest.approx(expected[worst], rel=rel)
    assert summary.layers_over_1 == sum(v > 1 for v in expected.values())
    assert worst in summary.summary and f"--base-quant {summary.spec}" in summary.summary
    if alpha is not None and kind.startswith("llama"):
        assert 0 < summary.layers_over_1 < len(expected)


def test_inspect_quantizes_only_linear_weights(peft_case_factory) -> None:
    """embed_tokens stays 16-bit in a QLoRA model: no ratio, not counted."""
    case = peft_case_factory("llama_embedding")
    report = inspect_adapter(case.adapter_dir, base_path=case.base_dir, base_quant="nf4")
    rated = {layer.name for layer in report.layers if layer.base_quant_mismatch is not None}
    assert rated == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert report.base_quant is not None and report.base_quant.quantized_layers == 2
    embed = next(layer for layer in report.layers if layer.name == "model.embed_tokens")
    assert embed.base_quant_error is None and "quant_mismatch" not in embed.flags


def test_cli_json_and_table(llama_plain_case: PeftCase) -> None:
    args = ("inspect", llama_plain_case.adapter_dir, "--base", llama_plain_case.base_dir, "--alpha", "0.2")
    code, out, err = run_cli(*args, "--base-quant", "nf4,dq", "--json")
    assert code == 0 and err == ""
    document = json.loads(out)
    summary = document["base_quant"]
    assert set(summary) == {"spec", "double_quant", "blocksize", "quantized_layers", "layers_over_1", "max_mismatch",
                            "worst_layer", "summary"}
    assert summary["spec"] == "nf4,dq" and summary["double_quant"] is True and summary["blocksize"] == 64
    expected = expected_mismatch(llama_plain_case, BaseQuant(double_quant=True), 0.2)
    for layer in document["layers"]:
        assert layer["base_quant_mismatch"] == pytest.approx(expected[layer["name"]], rel=1e-9 if HAVE_BNB else 1e-5)
    assert summary["layers_over_1"] == sum(1 for layer in document["layers"] if "quant_mismatch" in layer["flags"]) > 0
    # Without --base-quant the document keeps its keys (and no torch import: test_cli_inspect).
    code, out, _ = run_cli(*args, "--json")
    plain = json.loads(out)
    assert code == 0 and "base_quant" not in plain and "base_quant_mismatch" not in plain["layers"][0]

    code, out, err = run_cli(*args, "--base-quant", "nf4,dq")
    assert code == 0 and err == ""
    assert "‖W0−nf4‖/‖ΔW‖" in out and "quant_mismatch" in out
    assert "merging onto the 16-bit base adds NF4's rounding error" in " ".join(out.split())


def test_grouped_table(llama_plain_case: PeftCase, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped by module, the ratio is a min / median / max column; layers flagged only
    quant_mismatch (most layers of a typical QLoRA adapter) are not listed one by one."""
    from lora_tools.render import inspect_table

    monkeypatch.setattr(inspect_table, "MAX_ROWS", 5)
    code, out, err = run_cli("inspect", llama_plain_case.adapter_dir, "--base", llama_plain_case.base_dir, "--alpha", "0.2",
                             "--base-quant", "nf4,dq")
    assert code == 0 and err == ""
    assert "layers grouped by module" in out and "‖W0−nf4‖/‖ΔW‖" in out and " / " in out
    assert "flagged layers" not in out and "quant_mismatch" not in out
    assert "above 1× on" in " ".join(out.split())


@pytest.mark.parametrize("args, fragment", [
    (("--base-quant", "nf4"), "--base-quant needs --base"),
    (("--base-quant", "nf5", "--base", "BASE"), "'nf5': expected nf4 or nf4,dq"),
])
def test_cli_errors(llama_plain_case: PeftCase, args: tuple[str, ...], fragment: str) -> None:
    args = tuple(str(llama_plain_case.base_dir) if a == "BASE" else a for a in args)
    code, out, err = run_cli("inspect", llama_plain_case.adapter_dir, *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and fragment in err, err


# --------------------------------------------------------------------------- merge --base-quant


def _merge_has_base_quant() -> bool:
    from lora_tools.merge import merge

    return "base_quant" in pyinspect.signature(merge).parameters


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in representable values of their dtype between a and b."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16).to(torch.int64)
        return torch.where(bits < 0, -(bits & (0x7FFFFFFF if t.dtype == torch.float32 else 0x7FFF)), bits)

    return int((ordered(a) - ordered(b)).abs().max())


def _peft_merge_onto(case: PeftCase, replaced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload onto the base with some weights replaced (module path -> W)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=case.base_dtype).eval()
    with torch.no_grad():
        for module, weight in replaced.items():
            model.get_submodule(module).weight.copy_(weight)
    merged = PeftModel.from_pretrained(model, case.adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.skipif(not _merge_has_base_quant(), reason="lora_tools.merge.merge has no base_quant yet")
@pytest.mark.parametrize("kind, spec", [("llama_plain", "nf4,dq"), ("llama_bf16", "nf4"), ("llama_bf16", "nf4,dq"),
                                        ("gpt2_conv1d", "nf4,dq")])
def test_merge_onto_nf4_base(peft_case_factory, tmp_path: Path, kind: str, spec: str) -> None:
    """Adapted weights: PEFT's merge onto deq(NF4(W0)), to the last unit of the stored
    dtype; every other tensor byte-identical to the base."""
    from lora_tools.merge import merge

    case = peft_case_factory(kind)
    parsed = parse_base_quant(spec)
    if not _exact(parsed):
        pytest.skip("double quantization to the last bit needs bitsandbytes' float32 offset")
    base = _stored_tensors(case.base_dir)
    adapted = set(_lora_updates(case, None))
    if case.adapter_config.get("fan_in_fan_out"):  # Conv1D, stored (in, out): quantized as (out, in)
        quantized = {m: _deq(base[m + ".weight"].T.contiguous(), parsed).T.contiguous() for m in adapted}
    else:
        quantized = {m: _deq(base[m + ".weight"], parsed) for m in adapted}
    peft = _peft_merge_onto(case, quantized)
    out = tmp_path / "merged"
    merge(case.base_dir, [case.adapter_dir], out, base_quant=spec, device="cpu")
    merged = _stored_tensors(out)
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        assert tensor.dtype == base[name].dtype and tensor.shape == base[name].shape, name
        module = name.removesuffix(".weight")
        if module in adapted:
            assert _ulps(tensor, peft[name]) <= 1, name
            assert not torch.equal(tensor, base[name])
        else:
            assert same_bits(tensor, base[name]), f"{name} is not adapted but changed"
    assert os.path.exists(out / "config.json")


@pytest.mark.skipif(not _merge_has_base_quant(), reason="lora_tools.merge.merge has no base_quant yet")
def test_merge_cli(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """`merge --base-quant` writes what the library writes; a bad spec is one line, exit 2."""
    from lora_tools.merge import merge

    case = llama_plain_case
    merge(case.base_dir, [case.adapter_dir], tmp_path / "lib", base_quant="nf4", device="cpu")
    code, _, err = run_cli("merge", case.base_dir, case.adapter_dir, "-o", tmp_path / "cli", "--base-quant", "nf4",
                           "--device", "cpu", "-q")
    assert code == 0, err
    lib, cli = _stored_tensors(tmp_path / "lib"), _stored_tensors(tmp_path / "cli")
    assert set(lib) == set(cli) and all(same_bits(lib[k], cli[k]) for k in lib)
    code, out, err = run_cli("merge", case.base_dir, case.adapter_dir, "-o", tmp_path / "bad", "--base-quant", "nf4,dq,dq")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "'nf4,dq,dq'" in err, err
    assert not (tmp_path / "bad").exists()
