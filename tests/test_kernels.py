"""The optional C kernels (`io/_kernels.c`, loaded by `io.kernels.native`): the fused FP8
re-quantization pass gives the codes of torch's scale-clamp-cast passes bit for bit and
the survival sums of their float64 definitions; the block maxima are torch's; the bf16
rounding gives numpy's bits. Skipped only where the package was built without a C
compiler (then the numpy and torch paths run, which the other tests cover)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fp8_builders import assert_same_fp8_merges, build_block_fp8_base
from lora_tools.io import encode, fp8_fused
from lora_tools.io.fp8 import FreshScales, ScaleRule, block_amax, dequantize, fresh_scales, requantize
from lora_tools.io.fp8_fused import block_amax_checked, requantize_measured
from lora_tools.merge import merge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
pytest.importorskip("lora_tools.io._kernels", reason="built without a C compiler: torch's passes run instead")

E4M3 = torch.float8_e4m3fn


def _rounding_cases() -> torch.Tensor:
    """float32 values that take every rounding decision of e4m3fn: each finite code's
    value, each midpoint between neighbours (ties go to the even code) and the floats
    either side of it, random bit patterns up to 448, the subnormal range, and values
    past 448 (clamped); both signs, 128 to a row."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    values = values[values.isfinite()].unique()
    mids = ((values[1:].double() + values[:-1].double()) / 2).float()  # ≤ 5 significant bits: exact
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 0x43E00001, (1 << 16,), generator=generator, dtype=torch.int64)
    cases = torch.cat([
        values, mids, torch.nextafter(mids, torch.full_like(mids, 1e30)), torch.nextafter(mids, torch.zeros_like(mids)),
        patterns.to(torch.int32).view(torch.float32), torch.rand(4096, generator=generator) * 2.0**-6,
        torch.tensor([448.0, 448.5, 460.0, 464.0, 470.0, 1e6, 3e38]),
    ])
    cases = torch.cat([cases, -cases])
    return torch.cat([cases, torch.zeros(-cases.numel() % 128)]).view(-1, 128).contiguous()


def test_fused_codes_are_torchs_cast_for_every_rounding_case() -> None:
    """Scale 1: the kernel's codes are torch's clamp-and-cast of each value, and its sum
    Σ (deq(code) − W0)² with W0 = 0 is Σ value(code)² in float64."""
    values = _rounding_cases()
    rows = values.shape[0]
    ones = torch.ones(rows, 1)
    fresh = FreshScales(stored=ones, factor=ones, divide=False, amax=ones)
    old = torch.zeros(rows, 128, dtype=torch.uint8).view(E4M3)
    out = torch.empty(rows, 128, dtype=E4M3)
    kept_sq, unchanged = requantize_measured(values, (1, 128), fresh, torch.zeros_like(values), old, out)  # type: ignore[misc]
    expected = values.clamp(-448, 448).to(E4M3)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    assert kept_sq == pytest.approx(float((expected.double() ** 2).sum()), rel=1e-12)
    assert unchanged == int((expected.view(torch.uint8) == 0).sum())


@pytest.mark.parametrize("rule", [ScaleRule(), ScaleRule(multiplier_first=False), ScaleRule(power_of_two=True)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_pass_equals_torchs_passes(rule: ScaleRule, scale_dtype: torch.dtype, threads: int) -> None:
    """A merged block re-quantized both ways: the same codes; the kernel's sums equal
    Σ (dequantize(codes) − W0)² and the count of unchanged codes, whatever the threads
    (bf16 scales take the division, float32 multiplier-first ones the multiplication)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 150, generator=generator) * 0.02  # a partial last column block
    weight[:32, :32] = 0.0  # an all-zero block: scale 1
    weight[32:64, 32:48] *= 1e-5  # beside full-size values in their blocks: subnormal codes
    codes, scales = requantize(weight.clone(), (32, 32), E4M3, scale_dtype, rule)
    base = dequantize(codes, scales, (32, 32))
    merged = base + 3e-4 * torch.randn(96, 4, generator=generator) @ torch.randn(4, 150, generator=generator)
    fresh = fresh_scales(merged, (32, 32), E4M3, scale_dtype, rule)
    expected, stored = requantize(merged.clone(), (32, 32), E4M3, scale_dtype, rule, fresh=fresh)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty_like(codes)
        measured = requantize_measured(merged, (32, 32), fresh, base, codes, out)
    finally:
        torch.set_num_threads(before)
    assert measured is not None
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    kept = dequantize(expected, stored, (32, 32)) - base  # float32, as the torch path forms it
    assert measured[0] == pytest.approx(float((kept.double() ** 2).sum()), rel=1e-12)
    assert measured[1] == int((expected.view(torch.uint8) == codes.view(torch.uint8)).sum())


def test_fused_pass_declines_what_it_does_not_do() -> None:
    """e5m2 codes and a non-contiguous block: None, nothing written (torch's passes run)."""
    values = torch.randn(32, 64)
    fresh = fresh_scales(values, (32, 32), torch.float8_e5m2, torch.float32, ScaleRule())
    out = torch.zeros(32, 64, dtype=torch.uint8).view(torch.float8_e5m2)
    old = torch.zeros(32, 64, dtype=torch.uint8).view(torch.float8_e5m2)
    assert requantize_measured(values, (32, 32), fresh, values, old, out) is None
    assert requantize_measured(values.t().contiguous().t(), (32, 32), fresh, values, old.view(E4M3),
                               out.view(E4M3)) is None
    assert not out.view(torch.uint8).any()


def test_merge_bytes_do_not_depend_on_the_kernel(llama_plain_case, peft_case_factory, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`merge --dtype fp8` with the kernel and with torch's passes: every output byte the
    same, the same unchanged shares, survival figures equal to float32 rounding."""
    base = build_block_fp8_base(llama_plain_case.base_dir, tmp_path / "base")
    adapters = [llama_plain_case.adapter_dir, peft_case_factory("llama_rslora").adapter_dir]
    fused = merge(base, adapters, tmp_path / "fused", device="cpu", dtype="fp8", weights=[0.8, 1.5])
    monkeypatch.setattr(fp8_fused, "native", lambda: None)
    passes = merge(base, adapters, tmp_path / "passes", device="cpu", dtype="fp8", weights=[0.8, 1.5])
    assert_same_fp8_merges(fused, tmp_path / "fused", passes, tmp_path / "passes")


def test_kernel_refuses_buffers_that_do_not_fit() -> None:
    """A buffer shorter than rows × cols (or not C-contiguous) is a ValueError, not a
    read past its end."""
    from lora_tools.io import _kernels

    values = torch.zeros(4, 8).numpy()
    grid = torch.ones(4, 1).numpy()
    codes = torch.zeros(4, 8, dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="values"):
        _kernels.requantize_rows(values[:2], grid, grid, values, codes, codes.copy(), 4, 8, 8, False)
    with pytest.raises(ValueError, match="out_codes"):
        _kernels.requantize_rows(values, grid, grid, values, codes, codes[:, ::2].copy(), 4, 8, 8, False)
    with pytest.raises(ValueError, match="block_cols"):
        _kernels.requantize_rows(values, grid, grid, values, codes, codes.copy(), 4, 8, 0, False)


@pytest.mark.parametrize("shape", [(96, 150), (100, 64), (7, 300)])
def test_fused_block_maxima_equal_torchs(shape: tuple[int, int]) -> None:
    """The kernel's block maxima are `block_amax`'s exactly, partial blocks of rows and
    columns included (and ±0.0 and subnormals among the values); a NaN or an infinity
    anywhere gives None."""
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(shape, generator=generator) * 10
    values[0, :5] = torch.tensor([0.0, -0.0, 1e-42, -1e-42, -3.0])
    values[:, -1] = -values[:, -1].abs() * 7  # a row block's maximum from a negative value
    assert torch.equal(block_amax_checked(values, (32, 32)), block_amax(values, (32, 32)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = values.clone()
        spoiled[shape[0] - 1, shape[1] // 2] = bad
        assert block_amax_checked(spoiled, (32, 32)) is None


def _bf16_cases() -> np.ndarray:
    """float32 bit patterns for every rounding decision of float32 → bf16: random patterns
    of every exponent, each tie (low half 0x8000) with an even and an odd kept bit, the
    floats either side of the ties, and the largest finite values (which round to inf
    from 0x7F7F8000 on)."""
    generator = np.random.default_rng(7)
    random = generator.integers(0, 0x7F800000, 1 << 16, dtype=np.uint32)
    high = generator.integers(0, 0x7F80, 4096, dtype=np.uint32) << 16
    ties = np.concatenate([high | 0x8000, high | 0x8000 | 0x10000, high | 0x7FFF, high | 0x8001])
    top = np.arange(0x7F7F7FF0, 0x7F800000, dtype=np.uint32)
    cases = np.concatenate([random, ties, top, [0, 1, 0x00800000]]).astype(np.uint32)
    return np.concatenate([cases, cases | 0x80000000]).view(np.float32)


def test_bf16_rounding_is_numpys_bit_for_bit() -> None:
    """`float32_to_bf16_bits` (the kernel where it applies) against numpy's passes on every
    case; a value that rounds past bf16's largest is refused by both, and NaN and inf still
    give the +inf pattern the writers refuse."""
    values = _bf16_cases()
    finite = values[np.abs(values.view(np.uint32) & 0x7FFFFFFF) < 0x7F7F8000]
    assert encode.native() is not None
    ours = encode.float32_to_bf16_bits(finite)
    scratch, carry, reference = finite.copy(), np.empty(finite.size, np.uint32), np.empty(finite.size, np.uint16)
    encode._round_bf16(scratch, carry, reference)
    assert np.array_equal(ours, reference)
    assert encode.bf16_finite(ours)
    past = np.array([0x7F7F8000], np.uint32).view(np.float32)[0]  # a tie up from bf16's largest (odd)
    for bad in (past, np.float32(np.inf), np.float32(np.nan)):
        spoiled = finite.copy()
        spoiled[123] = bad
        assert encode.float32_to_bf16_bits(spoiled)[123] == 0x7F80
        with pytest.raises(encode.WriteError):
            encode.encode_blocks(spoiled.shape, [((slice(None),), spoiled)], "BF16")


@pytest.mark.parametrize("contiguous", [True, False])
def test_bf16_blocks_equal_numpys(contiguous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`encode_blocks` into a bf16 tensor, rows (contiguous targets) or columns (strided:
    staged, then copied) at a time: the same bits with and without the kernel."""
    values = _bf16_cases()[: 64 * 1000].reshape(64, 1000)
    values = values[np.abs(values) < 1e38]
    values = values[: values.size // 64 * 64].reshape(64, -1)
    if contiguous:
        blocks = [((slice(i, i + 16), slice(None)), np.ascontiguousarray(values[i:i + 16])) for i in range(0, 64, 16)]
    else:
        blocks = [((slice(None), slice(j, j + 100)), np.ascontiguousarray(values[:, j:j + 100]))
                  for j in range(0, values.shape[1] - 99, 100)]
    shape = values.shape if contiguous else (64, len(blocks) * 100)
    ours = encode.encode_blocks(shape, blocks, "BF16")
    monkeypatch.setattr(encode, "native", lambda: None)
    reference = encode.encode_blocks(shape, blocks, "BF16")
    assert np.array_equal(ours.bits, reference.bits)


@pytest.mark.parametrize("largest_scale", [1e-38, 3e-3, 1e3, 1e30])
def test_fp8_rows_decode_as_torchs_cast_times_the_scale(largest_scale: float) -> None:
    """`RowDequantizer` by the kernel: every e4m3fn code times its block's scale, rounded
    once, as torch's cast times the scale gives it (signed zeros, subnormal codes, products
    that are float32 subnormals or near its top); NaN codes NaN."""
    from lora_tools.io.fp8 import RowDequantizer

    codes = torch.arange(256, dtype=torch.uint8).repeat(48).view(96, 128)
    q = codes.view(E4M3)
    scale = torch.rand((3, 4), generator=torch.Generator().manual_seed(9)) * largest_scale
    rows = RowDequantizer(q, scale, (32, 32))
    assert rows.kernel is not None
    out = torch.empty(96, 128)
    for lo in range(0, 96, 48):
        rows(out[lo:lo + 48], lo, lo + 48)
    expected = q.float() * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    nan = (codes & 0x7F) == 0x7F
    assert bool(out[nan].isnan().all()) and not bool(out[~nan].isnan().any())
    assert torch.equal(out[~nan].view(torch.int32), expected[~nan].view(torch.int32))
