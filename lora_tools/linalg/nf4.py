"""bitsandbytes' NF4 round trip, deq(NF4(W)): the weight a QLoRA adapter was trained against.

A QLoRA run loads the base through bitsandbytes' `Params4bit`, which quantizes each Linear
weight from its load dtype with `quantize_4bit(quant_type="nf4")`; every forward pass then
sees the dequantized weight, so the adapter learned ΔW against deq(NF4(W)), not W. This
module recomputes that weight with torch, on the tensor's own device, from bitsandbytes'
definition (checked against bitsandbytes 0.50.2, `backends/default/ops.py` and
`functional.py`, and against its CUDA kernel `kQuantizeBlockwise`, `csrc/kernels.cu`):

- the tensor, row-major and flattened, is cut into blocks of `blocksize` values (64);
  a last, shorter block is a block of its own with its own absmax;
- everything is float32: absmax = max |w| per block, x = w·(1/absmax) (the tail block:
  w/absmax), clamped to [−1, 1];
- x goes to the nearest of the 16 NF4 code values, a value exactly on a midpoint to the
  lower one (`torch.bucketize` on the float32 midpoints; CUDA's `dQuantizeNF4` compares
  with `>` against the same float32 midpoints);
- dequantized: code[q]·absmax in float32, then cast to the tensor's dtype;
- double quantization (`compress_statistics`, QLoRA's "double quant") stores the absmax
  values themselves in 8 bits: offset = mean(absmax), then absmax − offset is quantized
  blockwise (256 values a block, float32 absmax2) to the nearest value of the signed
  256-entry `create_dynamic_map()`; dequantization uses code8[q]·absmax2 + offset.

Known departures from bitsandbytes, all in what bitsandbytes itself does not agree on:
its native CPU library quantizes the 8-bit absmax codes through a 65 536-bin lookup table
(an approximation: ~0.15 % of the codes differ from the nearest value, so a dq round trip
on CPU can differ from CUDA's); this module takes the nearest value, as CUDA and the
PyTorch reference kernel do. CUDA's binary search breaks an exact 8-bit tie toward the
code it visited last, and multiplies a tail block by 1/absmax where the reference kernel
divides; both need a value exactly on a rounding boundary. The dq offset is torch's
float32 mean on the tensor's device, as in bitsandbytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_tools.adapter import LoraLayer
from lora_tools.errors import RequestError

if TYPE_CHECKING:
    import torch

# bitsandbytes `get_4bit_type("nf4")`: quantiles of N(0, 1), normalised to [−1, 1].
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what quantize_4bit accepts
DEFAULT_BLOCKSIZE = 64  # quantize_4bit, Params4bit and transformers' default
DQ_BLOCKSIZE = 256  # quantize_4bit's quantize_blockwise of the absmax values
# bitsandbytes quantizes only these (safetensors dtype codes).
QUANTIZABLE_DTYPES = ("F32", "BF16", "F16")
# Elements per pass: bounds the float32 temporaries (~16 MB each), a multiple of every blocksize.
_CHUNK = 1 << 22
_TINY = 1e-38  # bitsandbytes clamps absmax to this before dividing by it

SYNTAX = "nf4 or nf4,dq, optionally with ,blocksize=N (N one of " + ", ".join(map(str, BLOCKSIZES)) + ")"


@dataclass(frozen=True)
class BaseQuant:
    """How a QLoRA base was quantized: NF4, with or without double quantization."""

    double_quant: bool = False
    blocksize: int = DEFAULT_BLOCKSIZE
    quant_type: str = "nf4"

    def __str__(self) -> str:
        """The option text that gives this spec back (`parse_base_quant(str(spec)) == spec`)."""
        return ",".join([self.quant_type, *(["dq"] if self.double_quant else []),
                         *([f"blocksize={self.blocksize}"] if self.blocksize != DEFAULT_BLOCKSIZE else [])])


def parse_base_quant(text: str) -> BaseQuant:
    """`--base-quant` text → BaseQuant: "nf4", "nf4,dq", "nf4,dq,blocksize=64" (order of
    the parts after nf4 free, each at most once). Anything else is a RequestError."""
    parts = [part.strip().lower() for part in text.split(",")]
    seen: set[str] = set()
    double_quant, blocksize = False, DEFAULT_BLOCKSIZE
    ok = parts[0] == "nf4"
    for part in parts[1:]:
        key = part.split("=", 1)[0]
        if not ok or key in seen:
            ok = False
            break
        seen.add(key)
        if part == "dq":
            double_quant = True
        elif (m := re.fullmatch(r"blocksize=(\d{1,5})", part)) and int(m.group(1)) in BLOCKSIZES:
            blocksize = int(m.group(1))
        else:
            ok = False
    if not ok:
        raise RequestError(None, f"--base-quant {text!r}: expected {SYNTAX}")
    return BaseQuant(double_quant=double_quant, blocksize=blocksize)


def quantized_by_bitsandbytes(layer: LoraLayer, weight_shape: tuple[int, ...]) -> bool:
    """Whether a QLoRA base holds this layer's weight in NF4. transformers swaps nn.Linear
    (and GPT-2's Conv1D, transposed to (out, in) first) for bitsandbytes' Linear4bit and by
    default keeps the output embedding, `lm_head`, in 16 bit; embeddings and convolutions
    stay as loaded. A 2-D weight of a linear layer not named lm_head, then."""
    return layer.kind == "linear" and len(weight_shape) == 2 and layer.name.rsplit(".", 1)[-1] != "lm_head"


def nf4_round_trip(w: torch.Tensor, spec: BaseQuant) -> torch.Tensor:
    """deq(NF4(w)) in w's dtype, shape and device: what bitsandbytes' `dequantize_4bit`
    returns for `quantize_4bit(w, blocksize, compress_statistics=spec.double_quant,
    quant_type="nf4")`. Blocks run over w row-major (a transposed view is quantized in the
    order it is read, as `.contiguous()` would lay it out)."""
    import torch

    _check_dtype(w)
    flat = w.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=w.dtype, device=w.device)
    for span, deq in _dequantized_spans(flat, spec):
        out[span] = deq.to(w.dtype)
    return out.reshape(w.shape)


def round_trip_stored(w: torch.Tensor, spec: BaseQuant, transposed: bool) -> torch.Tensor:
    """`nf4_round_trip` of a base weight as stored: a Conv1D weight stored (in, out)
    (`transposed`) is quantized as transformers hands it to bitsandbytes, (out, in), and
    given back in its stored layout, contiguous."""
    if not transposed:
        return nf4_round_trip(w, spec)
    return nf4_round_trip(w.T, spec).T.contiguous()


def round_trip_error(w: torch.Tensor, spec: BaseQuant) -> float:
    """‖w − deq(NF4(w))‖_F in float64, the dequantized weight first cast to w's dtype (the
    weight the model computes with). Chunked: no full-size float64 copy. Transposing w
    does not change the norm, but does change the blocks: pass the (out, in) view."""
    import torch

    _check_dtype(w)
    flat = w.contiguous().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for span, deq in _dequantized_spans(flat, spec):
        diff = flat[span].to(torch.float64) - deq.to(w.dtype).to(torch.float64)
        total += torch.dot(diff, diff)
    return float(total.sqrt())


# --------------------------------------------------------------------------- the quantizer


def _check_dtype(w: torch.Tensor) -> None:
    import torch

    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RequestError(None, f"--base-quant nf4: bitsandbytes quantizes float32, bfloat16 and float16 weights, not {w.dtype}")


def _dequantized_spans(flat: torch.Tensor, spec: BaseQuant) -> Iterator[tuple[slice, torch.Tensor]]:
    """(span of flat, deq(NF4) of those values in float32), span after span."""
    import torch

    n, size = flat.numel(), spec.blocksize
    if n == 0:
        return
    absmax = _blockwise_absmax(flat, size)  # float32, the tail block's clamped to _TINY
    scale = absmax if not spec.double_quant else _double_quantized(absmax)
    code = _code(NF4_CODE, flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    full = n - n % size
    for start in range(0, full, _CHUNK):
        stop = min(full, start + _CHUNK)
        blocks = slice(start // size, stop // size)
        x = flat[start:stop].float().view(-1, size)
        scaled = torch.clamp(x * (1.0 / absmax[blocks].clamp(min=_TINY)).view(-1, 1), -1, 1)
        q = torch.bucketize(scaled, bounds, out_int32=True)
        yield slice(start, stop), (code[q] * scale[blocks].view(-1, 1)).reshape(-1)
    if full < n:  # the tail block: bitsandbytes divides by its absmax here
        tail = flat[full:].float()
        q = torch.bucketize(torch.clamp(tail / absmax[-1], -1, 1), bounds, out_int32=True)
        yield slice(full, n), code[q] * scale[-1]


def _blockwise_absmax(flat: torch.Tensor, size: int) -> torch.Tensor:
    """max |x| per block of `size` (float32); the tail block's clamped to _TINY, as
    bitsandbytes clamps it (and not the others)."""
    import torch

    n = flat.numel()
    full = n - n % size
    parts = [flat[start:min(full, start + _CHUNK)].float().view(-1, size).abs().amax(dim=1)
             for start in range(0, full, _CHUNK)]
    if full < n:
        parts.append(flat[full:].float().abs().amax().clamp(min=_TINY).reshape(1))
    return torch.cat(parts)


def _double_quantized(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax values as double quantization gives them back: code8[q]·absmax2 + offset
    (float32), q the nearest entry of the dynamic map to (absmax − offset)/absmax2."""
    import torch

    offset = absmax.mean()
    values = absmax - offset
    code = _code(dynamic_map(), absmax.device)
    bounds = (code[:-1] + code[1:]) / 2
    n, size = values.numel(), DQ_BLOCKSIZE
    full = n - n % size
    out = []
    if full:
        blocks = values[:full].view(-1, size)
        absmax2 = blocks.abs().amax(dim=1)
        scaled = torch.clamp(blocks * (1.0 / absmax2.clamp(min=_TINY)).view(-1, 1), -1, 1)
        out.append((code[torch.bucketize(scaled, bounds, out_int32=True)] * absmax2.view(-1, 1)).reshape(-1))
    if full < n:
        tail = values[full:]
        tail_max = tail.abs().amax().clamp(min=_TINY)
        q = torch.bucketize(torch.clamp(tail / tail_max, -1, 1), bounds, out_int32=True)
        out.append(code[q] * tail_max)
    return torch.cat(out) + offset


@functools.cache
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' `create_dynamic_map()` (signed, 7 exponent bits, 8 bits): 256 sorted
    float32 values in [−0.99296875, 1]. For each decade 10⁻⁶…10⁰, 2^i values at the
    midpoints of a float32 linspace(0.1, 1, 2^i + 1), with both signs; then 0 and 1."""
    import torch

    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return tuple(sorted(data))


@functools.cache
def _code_on(values: tuple[float, ...], device: str) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.float32, device=device)


def _code(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return _code_on(values, str(device))
