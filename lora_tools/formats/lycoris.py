"""LyCORIS files (kohya-style keys): LoHa, LoKr, LoCon with Tucker cores, full diffs, DoRA
scales, read into exact LoRA layers.

Keys are `<prefix>_<module path with "." as "_">.<role>` with the prefix `lycoris` (networks
made by `create_lycoris` on a plain model) or kohya's `lora_unet`, `lora_te[1-3]`. Every
algorithm's ΔW has an exact low-rank factorisation, so each layer becomes a `LoraLayer`
(ΔW = s·B·A) with `algo` naming what the file held; inspect, merge, verify, blend,
resize and convert then take them unchanged. From lycoris-lora 4.1.3's sources:

- LoCon (`modules/locon.py`, `functional/locon.py` `_diff_weight`): ΔW = s·up·down; with a
  Tucker core `lora_mid` (r, r, kh, kw): ΔW[o, i, k] = s·Σ_pq up[o,p]·mid[p,q,k]·down[q,i],
  i.e. B = up, A[p, (i, k)] = Σ_q mid[p,q,k]·down[q,i].
- LoHa (`modules/loha.py` `get_weight`, `functional/loha.py` `_diff_weight`): ΔW =
  s·(w1_a·w1_b) ⊙ (w2_a·w2_b) = s·(U₁ ⊙ᵣ U₂)(V₁ ⊙ᵣ V₂)ᵀ (row-wise Khatri–Rao: B[o, (i,j)] =
  U₁[o,i]·U₂[o,j], A[(i,j), c] = V₁[i,c]·V₂[j,c]), rank r₁·r₂. With Tucker cores `hada_t1`,
  `hada_t2` (r, r, kh, kw) the factors are stored transposed: `hada_w1_a` (r, out), `hada_w1_b`
  (r, in), W₁[o, (i,k)] = Σ_ab t1[a,b,k]·w1_a[a,o]·w1_b[b,i].
- LoKr (`modules/lokr.py` `get_weight`, `functional/lokr.py` `_kron_weight`, `make_kron`): ΔW =
  s·kron(W₁, W₂), W₁ = `lokr_w1` or `lokr_w1_a`·`lokr_w1_b`, W₂ = `lokr_w2` or
  `lokr_w2_a`·`lokr_w2_b` (or the Tucker form with `lokr_t2`), kron(U₁V₁, U₂V₂) =
  kron(U₁,U₂)·kron(V₁,V₂); a full side is I·W or W·I, whichever is smaller. When both sides
  are full, alpha is ignored (s = 1: `alpha = lora_dim` in `LokrModule.__init__`).
- Full (`modules/full.py`): ΔW = `diff`, the bias changes by `diff_b`; as a LoRA, B = diff and
  A = I (or I and diff, the smaller identity), s = 1.
- s = alpha / r with r the algorithm's own dim (`lora_down`, `hada_w1_b`, the factored LoKr
  side's rows): LyCORIS saves alpha·dim/r_factor, so rsLoRA reads right too; alpha absent
  or 0 means s = 1.
- DoRA (`functional/general.py` `_weight_decompose`): W' = (W0 + ΔW)·m / (‖W0 + ΔW‖ + eps),
  eps = `finfo(dora_scale.dtype).eps`, the norm per output row when `dora_scale` is
  (out, 1, …) (wd_on_output) or per input column when it is (1, in, …).

Factors made of products are kept in float64 and `dtype` says the narrowest float that
holds them exactly (products of bf16/fp16 values are exact in float32; of float32 values,
and any sum, only in float64), so no reader of these layers rounds what the file means.
Conv factors whose kernel the file flattens (`hada_w1_b` (r, in·kh·kw)) stay 2-D; a base
weight fits them flattened (`engine.binding`). LoHa and LoKr layers also keep their two
sides (U, V) with W = U·V (`hadamard_sides`, `kron_sides`), from which inspect takes σ
without forming B or A (`linalg.hadamard.hadamard_singular_values`, `factored.kron_singular_values`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.errors import FormatError
from lora_tools.formats.common import DuplicateRole, KeyGroups, scalar_alpha
from lora_tools.formats.source import ReadAhead, TensorSource, finite_factor

__all__ = ["LYCORIS_PREFIX", "ROLES", "ScaleRule", "build_layer", "build_layers", "grouped", "load_lycoris", "looks_like_lycoris"]

# the scale s of a layer, given the dim of its factored part (None: no factored part)
ScaleRule = Callable[[int | None], float]
# LoKr's and LoHa's two sides as (U, V) with W = U·V: ΔW = s·kron(W₁, W₂) or s·W₁∘W₂
Sides = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

LYCORIS_PREFIX = "lycoris_"
ROLES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
          "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
          "lokr_w2_b", "lokr_t2", "diff", "diff_b")
_KEY = re.compile(r"^(?P<m>(?:lycoris|lora_unet|lora_te[123]?|lora_transformer)_[A-Za-z0-9_]+?)\.(?P<role>"
                  + "|".join(re.escape(r) for r in ROLES) + ")$")
_LYCORIS_ONLY = {r for r in ROLES if r not in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")}
# the stored dtype whose products are exact in float32
_NARROW = {"BF16", "F16"}


class BuiltFactor:
    """A factor made from the stored tensors (a Khatri–Rao or Kronecker product), computed
    each time it is read (`np.asarray`, `reshape`) and never held: a LoHa/LoKr file's exact
    LoRA form can be far larger than the file (a LoKr W₁⊗(W₂ₐ·W₂ᵦ) on a 10240×1280 weight is
    10240×160 of float64), and inspect needs one layer at a time. Shape, ndim and dtype are
    known without computing it, which is all most code asks of a factor."""

    def __init__(self, shape: tuple[int, ...], make: Callable[[], np.ndarray]) -> None:
        self.shape = shape
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float64)
        self._make = make

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = self._make().reshape(self.shape)
        return value if dtype is None else value.astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        return np.asarray(self).reshape(*shape)


def looks_like_lycoris(keys: list[str]) -> bool:
    """LyCORIS-only roles, or create_lycoris' `lycoris_` names."""
    for key in keys:
        match = _KEY.match(key)
        if match and (match.group("role") in _LYCORIS_ONLY or match.group("m").startswith(LYCORIS_PREFIX)):
            return True
    return False


class _Module:
    """One module's tensors, read on demand with their shapes checked as they are used."""

    def __init__(self, source: TensorSource, name: str, roles: dict[str, str], reader: ReadAhead | None = None) -> None:
        self.source, self.name, self.roles, self.reader = source, name, roles, reader

    def has(self, role: str) -> bool:
        return role in self.roles

    def get(self, role: str) -> np.ndarray:
        if role not in self.roles:
            raise FormatError(self.source.path, f"module {self.name!r}: has no {role!r} (its {self._algo()} "
                                                "update needs it)")
        key = self.roles[role]
        value = self.reader.get(key) if self.reader is not None else finite_factor(self.source, key)
        return np.asarray(value)  # as stored (bf16/fp16 widened exactly)

    def matrix(self, role: str, rows: int | None = None) -> np.ndarray:
        """The tensor as a 2-D matrix (its first axis kept), rows checked."""
        value = self.get(role)
        value = value.reshape(value.shape[0], -1) if value.ndim != 2 else value
        if rows is not None and value.shape[0] != rows:
            self.fail(f"{role!r} has {value.shape[0]} rows, expected {rows}")
        return value

    def fail(self, problem: str) -> NoReturn:
        raise FormatError(self.source.path, f"module {self.name!r}: {problem}")

    def stored(self) -> str:
        """The factors' stored dtype code (the widest, should a file mix them)."""
        codes = {self.source.dtype(key) for role, key in self.roles.items() if role not in ("alpha", "dora_scale")}
        for code in ("F64", "F32", "F16", "BF16"):
            if code in codes:
                return code
        return "F32"

    def _algo(self) -> str:
        return _algo(self.roles)


def _algo(roles: dict[str, str]) -> str:
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "diff" in roles:
        return "full"
    return "locon" if "lora_mid.weight" in roles else "lora"


def _khatri_rao_rows(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """X[o, (i,j)] = u1[o,i]·u2[o,j] for u1 (n, r1), u2 (n, r2): (n, r1·r2), float64
    (a product of two float32 values is exact there)."""
    return np.multiply(u1[:, :, None], u2[:, None, :], dtype=np.float64).reshape(u1.shape[0], -1)


def _khatri_rao_columns(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """X[(i,j), c] = v1[i,c]·v2[j,c] for v1 (r1, n), v2 (r2, n): (r1·r2, n), rows contiguous, float64."""
    return np.multiply(v1[:, None, :], v2[None, :, :], dtype=np.float64).reshape(-1, v1.shape[1])


def _kron(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """kron(x, y) in float64: each element a product of one of each, exact there."""
    return np.kron(x.astype(np.float64), y.astype(np.float64))


def _tucker_side(module: _Module, core: str, outer: str, inner: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(U (out, R), V (R, in·k), kernel) of Σ_ab core[a,b,k]·outer[a,o]·inner[b,i], with
    outer (R, out) and inner (R, in) as LyCORIS stores Tucker factors."""
    t = module.get(core)  # (R, R, *k)
    wa, wb = module.matrix(outer), module.matrix(inner)  # (R, out), (R, in)
    if t.ndim < 2 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
        module.fail(f"Tucker core {core!r} of shape {list(t.shape)} does not match {outer!r} rank {wa.shape[0]} "
                    f"and {inner!r} rank {wb.shape[0]}")
    v = np.einsum("ab...,bi->ai...", t.astype(np.float64), wb.astype(np.float64))  # (R, in, *k): sums, float64
    return wa.T.astype(np.float64), v.reshape(v.shape[0], -1), tuple(t.shape[2:])


def _loha(module: _Module) -> tuple[Any, Any, int, tuple[int, ...], Sides]:
    if module.has("hada_t1") or module.has("hada_t2"):
        u1, v1, kernel = _tucker_side(module, "hada_t1", "hada_w1_a", "hada_w1_b")
        u2, v2, kernel2 = _tucker_side(module, "hada_t2", "hada_w2_a", "hada_w2_b")
        if kernel != kernel2:
            module.fail(f"Tucker cores of kernels {list(kernel)} and {list(kernel2)}")
        dim = module.get("hada_w1_b").shape[0]
    else:
        u1, u2 = module.matrix("hada_w1_a"), module.matrix("hada_w2_a")  # (out, r)
        w1b, w2b = module.get("hada_w1_b"), module.get("hada_w2_b")  # (r, in·k) or (r, in, *k)
        kernel = tuple(w1b.shape[2:])
        v1, v2 = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
        dim = v1.shape[0]
    if u1.shape[0] != u2.shape[0] or v1.shape[1] != v2.shape[1] or u1.shape[1] != v1.shape[0] \
            or u2.shape[1] != v2.shape[0]:
        module.fail(f"LoHa factors do not fit: w1 {list(u1.shape)}·{list(v1.shape)}, w2 {list(u2.shape)}·{list(v2.shape)}")
    rank = u1.shape[1] * u2.shape[1]
    b = BuiltFactor((u1.shape[0], rank), lambda: _khatri_rao_rows(u1, u2))  # (out, r1·r2)
    a = BuiltFactor((rank, v1.shape[1]), lambda: _khatri_rao_columns(v1, v2))  # (r1·r2, in·k)
    return b, a, dim, kernel, ((u1, v1), (u2, v2))


def _lokr_side(module: _Module, n: int) -> tuple[np.ndarray, np.ndarray, int | None, tuple[int, ...]]:
    """(U, V, the factored dim or None, kernel) of W_n = U·V, as matrices (rows, cols·k)."""
    full = f"lokr_w{n}"
    if module.has(full):
        w = module.get(full)
        kernel = tuple(w.shape[2:])
        w = w.reshape(w.shape[0], -1)
        rows, cols = w.shape
        return (w, np.eye(cols), None, kernel) if cols <= rows else (np.eye(rows), w, None, kernel)
    if n == 2 and module.has("lokr_t2"):
        u, v, kernel = _tucker_side(module, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        return u, v, u.shape[1], kernel
    u = module.matrix(f"lokr_w{n}_a")  # (rows, dim)
    b = module.get(f"lokr_w{n}_b")  # (dim, cols[·k]) or (dim, cols, *k)
    v = b.reshape(b.shape[0], -1)
    if u.shape[1] != v.shape[0]:
        module.fail(f"lokr_w{n}_a {list(u.shape)} and lokr_w{n}_b {list(b.shape)} do not chain")
    return u, v, v.shape[0], tuple(b.shape[2:])


def _lokr(module: _Module) -> tuple[Any, Any, int | None, tuple[int, ...], Sides]:
    u1, v1, dim1, kernel1 = _lokr_side(module, 1)
    u2, v2, dim2, kernel = _lokr_side(module, 2)
    if kernel1:
        module.fail(f"lokr_w1 has a kernel {list(kernel1)}: LyCORIS keeps kernels in W2")
    rank = u1.shape[1] * u2.shape[1]
    b = BuiltFactor((u1.shape[0] * u2.shape[0], rank), lambda: _kron(u1, u2))
    a = BuiltFactor((rank, v1.shape[1] * v2.shape[1]), lambda: _kron(v1, v2))
    return b, a, dim1 or dim2, kernel, ((u1, v1), (u2, v2))


def _full(module: _Module) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    diff = module.get("diff")
    kernel = tuple(diff.shape[2:])
    matrix = diff.reshape(diff.shape[0], -1)
    rows, cols = matrix.shape
    b, a = (matrix, np.eye(cols)) if cols <= rows else (np.eye(rows), matrix)
    return b, a, kernel


def _locon(module: _Module) -> tuple[np.ndarray, np.ndarray, int, tuple[int, ...], None]:
    up = module.matrix("lora_up.weight")  # (out, r)
    down = module.get("lora_down.weight")  # (r, in[, kh, kw]) or (r, in, 1, 1) under a Tucker core
    if module.has("lora_mid.weight"):
        mid = module.get("lora_mid.weight")  # (r_up, r_down, *k)
        if mid.ndim < 2 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
            module.fail(f"lora_mid of shape {list(mid.shape)} does not match lora_up rank {up.shape[1]} "
                        f"and lora_down rank {down.shape[0]}")
        a = np.einsum("pq...,qi->pi...", mid.astype(np.float64), down.reshape(down.shape[0], -1).astype(np.float64))
        return up, a.reshape(a.shape[0], -1), down.shape[0], tuple(mid.shape[2:]), None
    if up.shape[1] != down.shape[0]:
        module.fail(f"lora_up rank {up.shape[1]} and lora_down rank {down.shape[0]} differ")
    return up, down.reshape(down.shape[0], -1), down.shape[0], tuple(down.shape[2:]), None


def _file_scale(source: TensorSource, roles: dict[str, str], alpha_override: float | None) -> ScaleRule:
    """LyCORIS' own rule: s = alpha / dim, alpha from the module's `.alpha` tensor; no
    factored side (full LoKr, full diff) or no alpha means s = 1."""
    def scale(dim: int | None) -> float:
        if dim is None:
            return 1.0
        if alpha_override is not None:
            return alpha_override / dim
        if "alpha" not in roles:
            return 1.0
        alpha = scalar_alpha(source, roles["alpha"])
        return alpha / dim if alpha != 0 else 1.0
    return scale


def build_layers(source: TensorSource, modules: Mapping[str, dict[str, str]],
                 scale_of: Callable[[str, dict[str, str]], ScaleRule]) -> list[LoraLayer]:
    """Every module's layer, in order, `scale_of(name, roles)` giving its scale rule; the
    tensors are read ahead of the layers built from them (`ReadAhead`)."""
    keys = [key for roles in modules.values() for role, key in roles.items() if role != "alpha"]
    with ReadAhead(source, keys) as reader:
        return [build_layer(source, name, roles, scale_of(name, roles), reader) for name, roles in modules.items()]


def build_layer(source: TensorSource, name: str, roles: dict[str, str], scale_rule: ScaleRule,
                reader: ReadAhead | None = None) -> LoraLayer:
    """One module's layer; its tensors come through `reader` when the caller reads ahead."""
    module = _Module(source, name, roles, reader)
    algo = _algo(roles)
    dim: int | None
    kron: Sides | None = None
    hadamard: Sides | None = None
    if algo == "loha":
        b, a, dim, kernel, hadamard = _loha(module)
    elif algo == "lokr":
        b, a, dim, kernel, kron = _lokr(module)
    elif algo == "full":
        b, a, kernel = _full(module)
        dim = None
    else:
        b, a, dim, kernel, _ = _locon(module)
    scale = scale_rule(dim)
    rank = a.shape[0]
    conv = len(kernel) > 0  # a kernel the file shows; a flattened one stays a matrix
    in_dim = a.shape[1] // math.prod(kernel) if conv else a.shape[1]
    stored = module.stored()
    layer = LoraLayer(
        name=name, a=_shaped(a, (rank, in_dim, *kernel)) if conv else a,
        b=_shaped(b, (b.shape[0], rank, *(1,) * len(kernel))) if conv else b,
        alpha=scale * rank, kind="conv" if conv else "linear", dtype=_exact_dtype(algo, roles, stored),
        source_keys=tuple(roles.values()), algo=algo,
        stored_params=sum(math.prod(source.shape(key)) for role, key in roles.items() if role != "alpha"),
        kron_sides=kron, hadamard_sides=hadamard,
    )
    if "diff_b" in roles:  # full: s = 1, so the LoRA bias rule (bias + s·bias_B) adds diff_b itself
        layer.bias = module.get("diff_b")
        if layer.bias.shape != (b.shape[0],):
            module.fail(f"diff_b has shape {list(layer.bias.shape)}, expected ({b.shape[0]},)")
    if "dora_scale" in roles:
        _dora(module, layer)
    return layer


def _shaped(factor: Any, shape: tuple[int, ...]) -> Any:
    """The factor in the layer's stored shape (conv kernels), built lazily if it was."""
    if isinstance(factor, BuiltFactor):
        return BuiltFactor(shape, lambda: np.asarray(factor))
    return factor.reshape(shape)


def _exact_dtype(algo: str, roles: dict[str, str], stored: str) -> str:
    """The narrowest dtype holding the built factors exactly: the stored one for plain
    LoRA and full diffs (their values as read), float32 for products of bf16/fp16 values,
    float64 for products of wider ones and for the sums Tucker cores make."""
    if algo in ("lora", "full"):
        return stored
    if _sums(roles) or stored not in _NARROW:
        return "F64"
    return "F32"


def _sums(roles: dict[str, str]) -> bool:
    """Tucker cores make sums of products: exact only in float64."""
    return any(r in roles for r in ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2"))


def _dora(module: _Module, layer: LoraLayer) -> None:
    """dora_scale (out, 1, …): per output row; (1, in, …): per input column. LyCORIS
    builds its dora_scale parameter in float32 and adds that dtype's eps to the norm."""
    scale = module.get("dora_scale")
    out_dim, in_dim = int(layer.b.shape[0]), int(layer.a.shape[1])
    rest = scale.shape[2:] if scale.ndim >= 2 else ()
    if scale.ndim >= 2 and scale.shape[:2] == (out_dim, 1) and all(d == 1 for d in rest) and (out_dim, 1) != (1, in_dim):
        layer.magnitude_axis = "out"
    elif scale.ndim >= 2 and scale.shape[:2] == (1, in_dim) and all(d == 1 for d in rest):
        layer.magnitude_axis = "in"
    else:
        module.fail(f"dora_scale of shape {list(scale.shape)} is neither (out, 1, …) = ({out_dim}, 1, …) nor "
                    f"(1, in, …) = (1, {in_dim}, …)")
    layer.magnitude = scale.reshape(-1)
    layer.magnitude_eps = float(np.finfo(np.float32).eps)


def grouped(source: TensorSource, pattern: re.Pattern[str]) -> KeyGroups:
    """The file's keys by module (`m`) and role (`role`), the rest unclaimed."""
    groups = KeyGroups()
    try:
        for key in source.keys():
            match = pattern.match(key)
            if match:
                groups.add(match.group("m"), match.group("role"), key)
            else:
                groups.unclaimed.append(key)
    except DuplicateRole as exc:
        raise FormatError(source.path, str(exc)) from None
    return groups


def load_lycoris(source: TensorSource, *, alpha_override: float | None = None) -> Adapter:
    groups = grouped(source, _KEY)
    applied: dict[str, dict[str, str]] = {}
    for name, roles in groups.modules.items():
        if set(roles) <= {"alpha", "dora_scale"}:  # nothing to apply
            groups.unclaimed.extend(roles.values())
        else:
            applied[name] = roles
    layers = build_layers(source, applied, lambda name, roles: _file_scale(source, roles, alpha_override))
    if not layers:
        raise FormatError(source.path, "no LyCORIS or LoRA modules found")
    return Adapter(path=str(source.path), format="kohya", layers=layers, metadata=source.metadata,
                   unrecognized_keys=groups.unclaimed, names_resolved=False)
