"""The one dtype vocabulary: safetensors codes, their sizes, numpy and torch twins, and
the names users and config files give them.

Everything speaks safetensors codes ("BF16", "F32", …) inside lora-tools; this module
is the only place that knows another spelling of one. torch is imported only by the
two functions that need it, so that inspect (numpy only) and `--help` never pay for it.
"""

from __future__ import annotations

from typing import Any

DTYPE_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}

# Dtypes an FP8 weight's scales may be stored in (E8M0: power-of-two "ue8m0" scales).
SCALE_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E8M0"})

# Float dtypes an update can be added to and factors can be stored in.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# Dtypes whose values are numbers (a kohya `.alpha` may be stored in any of them).
NUMERIC_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"})

# safetensors (0.8) sorts tensors by this enum order, descending, then by name, so each
# tensor starts aligned to its item size. Copied from `enum Dtype` in safetensors/src/tensor.rs.
SAFETENSORS_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "C64", "F64", "I64", "U64",
)

# numpy dtypes that hold each safetensors dtype exactly (BF16 has none: it is read as
# uint16 bits and widened to float32, see safetensors_file).
NUMPY_DTYPE: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}

# User-facing --dtype names to safetensors codes.
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "f16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp64": "F64", "float64": "F64",
}

# The choices the commands offer, in the order their help lists them ("keep": as stored).
# "fp8": an FP8 base's own format, re-quantized with fresh scales (merge only).
MERGE_DTYPE_CHOICES = ("keep", "bf16", "fp16", "fp32", "fp8")
KEEP_FP8 = "fp8"
FACTOR_DTYPE_CHOICES = ("keep", "fp32", "fp16", "bf16", "fp64")

# What transformers' config.json calls each float dtype (`torch_dtype`, `dtype` from v5).
CONFIG_DTYPE_NAMES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def dtype_code(name: str) -> str | None:
    """The safetensors code for a user-facing dtype name; None for "keep", KeyError if unknown."""
    if name == "keep":
        return None
    return DTYPE_ALIASES[name.lower()]


def torch_dtype(code: str) -> Any:
    """The torch dtype for a safetensors dtype code such as "BF16"."""
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
        "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
        "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    }
    return table[code]


def safetensors_code(dtype: Any) -> str:
    """The safetensors dtype code for a torch dtype."""
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
        torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
        torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
        torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
    }
    return table[dtype]
