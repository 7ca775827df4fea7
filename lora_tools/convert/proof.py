"""The proof of a conversion: the written file read back, each layer compared with the one
it was made from, the way `verify` checks a merge.

A conversion changes names and the scale's bookkeeping, never the update. So a written
layer must hold exactly the input's factors as stored in the output dtype (bit for bit:
the input itself when the dtype is kept), and a scale equal to the input's up to the
float32 rounding of a kohya `.alpha` tensor; where a scale had to be folded into the
factors (GGUF's one alpha), its ΔW must equal the input's within one unit in the last
place of the stored dtype. ‖ΔW_out − ΔW_in‖_F is measured in float64 from the factors
(`linalg.factored`), never a dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_tools.adapter import LoraLayer
from lora_tools.io.encode import stored_values
from lora_tools.linalg.factored import concat_factors, frobenius_norm

# One unit in the last place, relative, of each stored dtype (2^-(mantissa bits)).
ULP = {"F64": 2.0**-52, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
# A kohya `.alpha` is a float32 tensor: the scale it gives is the exact one rounded once.
ALPHA_ROUNDING = 2.0**-24


@dataclass
class LayerProof:
    """One layer of the conversion; field names are the JSON keys."""

    name: str  # the input's layer name
    written_as: str  # its name in the output
    rank: int
    factors: str  # "identical", "rounded" (the input's in the output dtype), "folded" (a scale folded in) or "differ"
    scale_in: float
    scale_out: float
    relative_error: float  # ‖ΔW_out − ΔW_in‖_F / ‖ΔW_in‖_F (0.0 when both are 0)
    tolerance: float  # folded: the largest relative error `exact` allows; else the scale's (factors must match bit for bit)
    exact: bool


def _same(x: object, y: object) -> bool:
    if x is None or y is None:
        return x is None and y is None
    a, b = np.asarray(x), np.asarray(y)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _as_stored(values: object, stored: str, dtype: str) -> np.ndarray:
    """What a file in `dtype` holds for `values` read from a file in `stored`: the values
    themselves when the dtype is kept (a stored value survives decoding and encoding)."""
    array = np.asarray(values)
    return array if dtype == stored else stored_values(array, dtype)


def _relative_error(source: LoraLayer, written: LoraLayer, identical: bool) -> float:
    """‖s'·B'A' − s·BA‖_F / ‖s·BA‖_F in float64 from the factors."""
    norm = frobenius_norm(np.asarray(source.b_matrix), np.asarray(source.a_matrix), source.scale)
    if identical:  # the same factors: only the scale can differ
        gap = abs(written.scale - source.scale) * (norm / abs(source.scale) if source.scale else 0.0)
    else:
        b, a = concat_factors([(np.asarray(written.b_matrix), np.asarray(written.a_matrix), written.scale),
                               (np.asarray(source.b_matrix), np.asarray(source.a_matrix), -source.scale)])
        gap = frobenius_norm(b, a)
    if norm == 0.0:
        return 0.0 if gap == 0.0 else float("inf")
    return gap / norm


def prove_layer(source: LoraLayer, written: LoraLayer | None, written_as: str, dtype: str, folded: bool) -> LayerProof:
    """Compare the layer read back (`written`; None: missing from the file) with its source.
    `dtype`: the code the factors were written in; `folded`: the writer folded the scale."""
    if written is None:
        return LayerProof(source.name, written_as, source.rank, "missing", source.scale, 0.0, 1.0, 0.0, False)
    shapes_match = np.shape(written.a) == np.shape(source.a) and np.shape(written.b) == np.shape(source.b)
    if not shapes_match:
        return LayerProof(source.name, written_as, source.rank, "differ", source.scale, written.scale, 1.0, 0.0, False)
    # PEFT's lora_bias gives every layer a bias once one has it: a zero bias is no bias
    written_bias = None if written.bias is not None and source.bias is None and not np.any(np.asarray(written.bias)) \
        else written.bias
    same_extras = all(_same(_as_stored(x, source.dtype, dtype) if x is not None else None, y)
                      for x, y in ((source.magnitude, written.magnitude), (source.bias, written_bias)))
    if folded:
        error = _relative_error(source, written, identical=False)
        tolerance = ULP[dtype]
        return LayerProof(source.name, written_as, source.rank, "folded", source.scale, written.scale, error, tolerance,
                          error <= tolerance and same_extras)
    expect_a, expect_b = _as_stored(source.a, source.dtype, dtype), _as_stored(source.b, source.dtype, dtype)
    bitwise = _same(expect_a, written.a) and _same(expect_b, written.b)
    kind = ("identical" if dtype == source.dtype else "rounded") if bitwise else "differ"
    error = _relative_error(source, written, identical=bitwise and dtype == source.dtype)
    scale_ok = abs(written.scale - source.scale) <= ALPHA_ROUNDING * abs(source.scale)
    return LayerProof(source.name, written_as, source.rank, kind, source.scale, written.scale, error, ALPHA_ROUNDING,
                      bitwise and scale_ok and same_extras)
