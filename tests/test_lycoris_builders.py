"""Self-checks of the LyCORIS fixtures (tests/lycoris_builders.py), with lycoris-lora as the oracle.

The builder already checks its float64 truth against the fp32 forward of the network it
trained; here the truth is checked again in float64 against networks LyCORIS builds
back from the saved FILE (so the file alone determines it), and the known defects of
lycoris-lora 4.1.3 that a reader must not copy are pinned:
  * merge_to applies the LoHa/LoKr scale twice (get_diff_weight on top of get_weight);
  * create_lycoris_from_weights cannot load a DoRA file trained with wd_on_output=False
    (make_module_from_state_dict never passes wd_on_out) nor a LoKr tucker module (it reads
    the rank off lokr_w2_a.size(1), which is b in the tucker layout).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lycoris")

import lycoris_builders as lb  # noqa: E402
from lycoris_builders import LYCORIS_CASE_KINDS, LYCORIS_MODULE_SHAPES, LycorisCase  # noqa: E402

# The tensor names (after "<prefix>.") each module carries, per case.
_L2, _CONV1, _CONV3 = "linear", "conv1x1", "conv3x3"
_KIND_OF = {"blocks.0.attn_to_q": _L2, "blocks.0.ff.proj_out": _L2, "blocks.0.proj_in": _CONV1,
            "blocks.0.res_block.conv1": _CONV3}
_LOHA = {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
_LOCON = {"alpha", "lora_up.weight", "lora_down.weight"}
_EXPECTED_KEYS: dict[str, dict[str, set[str]]] = {
    "loha": {p: _LOHA for p in _KIND_OF},
    "loha_bf16": {p: _LOHA for p in _KIND_OF},
    "loha_tucker": {p: _LOHA | ({"hada_t1", "hada_t2"} if k == _CONV3 else set()) for p, k in _KIND_OF.items()},
    "lokr_factored": {
        "blocks.0.attn_to_q": {"alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
        "blocks.0.ff.proj_out": {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        "blocks.0.proj_in": {"alpha", "lokr_w1", "lokr_w2"},
        "blocks.0.res_block.conv1": {"alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    },
    "lokr_full": {p: {"alpha", "lokr_w1", "lokr_w2"} for p in _KIND_OF},
    "lokr_tucker": {
        "blocks.0.attn_to_q": {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        "blocks.0.ff.proj_out": {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        "blocks.0.proj_in": {"alpha", "lokr_w1", "lokr_w2"},
        "blocks.0.res_block.conv1": {"alpha", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    },
    "locon_tucker": {p: _LOCON | ({"lora_mid.weight"} if k == _CONV3 else set()) for p, k in _KIND_OF.items()},
    "full": {p: {"diff"} | (set() if p == "blocks.0.attn_to_q" else {"diff_b"}) for p in _KIND_OF},
    "locon_dora_out": {p: _LOCON | {"dora_scale"} for p in _KIND_OF},
    "locon_dora_in": {p: _LOCON | {"dora_scale"} for p in _KIND_OF},
}


@pytest.fixture(scope="module")
def case_of(lycoris_case_factory: Callable[[str], LycorisCase]) -> Callable[[str], LycorisCase]:
    return lycoris_case_factory


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def _double_model() -> torch.nn.Module:
    return lb.tiny_model().double()


def _check_forward(model: torch.nn.Module, case: LycorisCase, rtol: float = 1e-10) -> None:
    """Each adapted layer of `model` (float64) computes x·W'ᵀ + b' with the case's truth."""
    base = case.base_tensors()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for path, mod in case.modules.items():
            bias = base.get(f"{path}.bias")
            if bias is not None and mod.bias_delta is not None:
                bias = bias + mod.bias_delta
            y, ref = lb._forward_pair(model.get_submodule(path), path, mod.merged, bias, torch.float64, g)
            err = (y - ref).abs().max().item()
            assert err <= rtol * max(1.0, ref.abs().max().item()), (case.name, path, err)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", LYCORIS_CASE_KINDS)
def test_case_files(kind: str, case_of: Callable[[str], LycorisCase]) -> None:
    case = case_of(kind)
    assert case.lora_file.name == f"{kind}.safetensors" and case.lora_file.parent.name == kind
    assert case.lora_file.parent.parent.name == "lycoris"
    header = _header(case.lora_file)
    meta = header.pop("__metadata__")
    assert meta == case.metadata
    if kind in ("full", "locon_tucker"):
        assert meta == {}  # save_weights(…, metadata=None) still writes an empty __metadata__
    else:
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"]
    want_dtype = "BF16" if kind == "loha_bf16" else "F32"
    assert case.dtype == want_dtype and {v["dtype"] for v in header.values()} == {want_dtype}

    got: dict[str, set[str]] = {}
    for key in header:
        prefix, _, name = key.partition(".")
        got.setdefault(prefix, set()).add(name)
    expected = {lb.lycoris_prefix(p): names for p, names in _EXPECTED_KEYS[kind].items()}
    assert got == expected
    for key, info in header.items():
        if key.endswith(".alpha"):
            assert info["shape"] == []  # a 0-d tensor

    base = load_file(case.base_file)
    assert {k: tuple(v.shape) for k, v in base.items() if k.endswith(".weight") and "norm" not in k} == {
        f"{p}.weight": s for p, s in LYCORIS_MODULE_SHAPES.items()}
    assert "blocks.0.norm.weight" in base and all(v.dtype == torch.float32 for v in base.values())

    assert set(case.modules) == set(LYCORIS_MODULE_SHAPES)
    for path, mod in case.modules.items():
        assert mod.module == path and mod.prefix == lb.lycoris_prefix(path) == "lycoris_" + path.replace(".", "_")
        assert mod.weight_shape == LYCORIS_MODULE_SHAPES[path]
        assert mod.merged.shape == mod.delta.shape == mod.weight_shape and mod.merged.dtype == np.float64
        assert np.abs(mod.delta).max() > 1e-3
        np.testing.assert_allclose(mod.merged, base[f"{path}.weight"].double().numpy() + mod.delta, rtol=0, atol=1e-12)
        assert (mod.bias_delta is not None) == (kind == "full" and f"{path}.bias" in base)


def test_names_need_the_base_to_resolve(case_of: Callable[[str], LycorisCase]) -> None:
    mod = case_of("loha").modules["blocks.0.ff.proj_out"]
    assert mod.prefix == "lycoris_blocks_0_ff_proj_out"
    naive = mod.prefix.removeprefix("lycoris_").replace("_", ".")
    assert naive != mod.module  # "blocks.0.ff.proj.out": underscores in names are ambiguous


def test_cached_and_reproducible(case_of: Callable[[str], LycorisCase], tmp_path: Path) -> None:
    case = case_of("lokr_factored")
    mtime = case.lora_file.stat().st_mtime_ns
    again = lb.build_lycoris_case("lokr_factored", case.lora_file.parent.parent.parent)
    assert case.lora_file.stat().st_mtime_ns == mtime
    for path in case.modules:
        assert np.array_equal(again.modules[path].merged, case.modules[path].merged)
    fresh = lb.build_lycoris_case("lokr_factored", tmp_path)  # same tensors (metadata key order may differ)
    for a, b in ((fresh.lora_file, case.lora_file), (fresh.base_file, case.base_file)):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert fresh.metadata == case.metadata


def test_bf16_case_is_bf16_everywhere(case_of: Callable[[str], LycorisCase]) -> None:
    case = case_of("loha_bf16")
    sd = load_file(case.lora_file)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert float(sd["lycoris_blocks_0_attn_to_q.alpha"]) == 6.0
    mod = case.modules["blocks.0.attn_to_q"]
    assert (mod.alpha, mod.dim, mod.scale) == (6.0, 4, 1.5)


# --------------------------------------------------------------------------- scales


_SCALES = {  # kind -> per module (alpha stored, dim, scale), order of LYCORIS_MODULE_SHAPES
    "loha": [(6.0, 4, 1.5), (6.0, 4, 1.5), (6.0, 4, 1.5), (1.0, 2, 0.5)],
    "loha_tucker": [(2.0, 4, 0.5), (2.0, 4, 0.5), (2.0, 4, 0.5), (4.5, 3, 1.5)],
    "lokr_factored": [(3.0, 2, 1.5), (3.0, 2, 1.5), (2.0, None, 1.0), (0.5, 1, 0.5)],
    "lokr_full": [(4.0, None, 1.0), (4.0, None, 1.0), (4.0, None, 1.0), (2.0, None, 1.0)],
    "lokr_tucker": [(1.0, 2, 0.5), (1.0, 2, 0.5), (2.0, None, 1.0), (3.0, 2, 1.5)],
    "locon_tucker": [(2.0, 4, 0.5), (2.0, 4, 0.5), (2.0, 4, 0.5), (6.0, 3, 2.0)],
    "locon_dora_out": [(8.0, 4, 2.0), (8.0, 4, 2.0), (8.0, 4, 2.0), (1.0, 2, 0.5)],
}


@pytest.mark.parametrize("kind", sorted(_SCALES))
def test_alpha_dim_scale(kind: str, case_of: Callable[[str], LycorisCase]) -> None:
    case = case_of(kind)
    got = [(m.alpha, m.dim, m.scale) for m in (case.modules[p] for p in LYCORIS_MODULE_SHAPES)]
    assert got == _SCALES[kind]


def test_lokr_ignores_alpha_when_w1_and_w2_are_full(case_of: Callable[[str], LycorisCase]) -> None:
    from lycoris.modules.lokr import LokrModule

    m = LokrModule("x", torch.nn.Linear(48, 32), 1.0, lora_dim=4, alpha=8.0, full_matrix=True)
    assert m.use_w1 and m.use_w2 and m.scale == 1.0 and float(m.alpha) == 4.0  # stored alpha = dim
    m = LokrModule("x", torch.nn.Linear(48, 32), 1.0, lora_dim=2, alpha=8.0)  # w1 full, w2 factored
    assert m.use_w1 and not m.use_w2 and m.scale == 4.0

    case = case_of("lokr_full")
    sd = {k: v.double().numpy() for k, v in load_file(case.lora_file).items()}
    assert json.loads(case.metadata["ss_network_args"])["full_matrix"] == "True" and case.metadata["ss_network_alpha"] == "8.0"
    for path, mod in case.modules.items():
        w1, w2 = sd[f"{mod.prefix}.lokr_w1"], sd[f"{mod.prefix}.lokr_w2"]
        w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - 2)))
        np.testing.assert_allclose(mod.delta, np.kron(w1, w2), rtol=0, atol=1e-14)


def test_dora_scale_layouts(case_of: Callable[[str], LycorisCase]) -> None:
    for kind, on_out in (("locon_dora_out", True), ("locon_dora_in", False)):
        case = case_of(kind)
        sd = load_file(case.lora_file)
        for path, mod in case.modules.items():
            out_dim, in_dim, *k = mod.weight_shape
            want = (out_dim, 1, *([1] * len(k))) if on_out else (1, in_dim, *([1] * len(k)))
            assert tuple(sd[f"{mod.prefix}.dora_scale"].shape) == want
            assert mod.dora_on_output is on_out
            # the merged weight has the stored magnitude along the normalised axis
            norm_axes = tuple(range(1, len(want))) if on_out else (0, *range(2, len(want)))
            mag = np.sqrt((mod.merged ** 2).sum(axis=norm_axes, keepdims=True))
            np.testing.assert_allclose(mag, sd[f"{mod.prefix}.dora_scale"].double().numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- LyCORIS, from the file


def _network_from_spec(kind: str, model: torch.nn.Module, **extra: object):
    import lycoris

    spec = lb._SPECS[kind]
    with lb._lycoris_targets():
        net = lycoris.create_lycoris(model, 1.0, linear_dim=spec.dim, linear_alpha=spec.alpha, algo=spec.algo,
                                     conv_dim=spec.conv_dim, conv_alpha=spec.conv_alpha, preset="full",
                                     **spec.kwargs, **extra)
    net.apply_to()
    return net


def _load_float64(net, case: LycorisCase) -> None:
    """The file's tensors, as float64, into `net`; then the whole network in float64.

    (LycorisNetwork.load_weights would hand full's pre-hook the fp32 diff, which adds
    W0 to it in fp32: right for an fp32 model, a rounding for this float64 check.)
    """
    sd = {k: v.to(torch.float64) for k, v in load_file(case.lora_file).items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("scalar")], (missing, unexpected)
    net.to(torch.float64)


@pytest.mark.parametrize("kind", LYCORIS_CASE_KINDS)
def test_truth_is_lycoris_forward_of_the_file(kind: str, case_of: Callable[[str], LycorisCase]) -> None:
    """A network made with the case's settings, loaded with load_weights(file), in float64."""
    case = case_of(kind)
    model = _double_model()
    net = _network_from_spec(kind, model)
    _load_float64(net, case)
    net.eval()
    _check_forward(model, case)


@pytest.mark.parametrize("kind", [k for k in LYCORIS_CASE_KINDS if k not in ("locon_dora_in", "lokr_tucker")])
def test_truth_is_forward_of_create_lycoris_from_weights(kind: str, case_of: Callable[[str], LycorisCase]) -> None:
    """LyCORIS' own loader (shapes and alpha from the file alone), in float64."""
    import lycoris

    case = case_of(kind)
    model = _double_model()
    with lb._lycoris_targets():
        net, _ = lycoris.create_lycoris_from_weights(1.0, str(case.lora_file), model)
    assert len(net.loras) == len(LYCORIS_MODULE_SHAPES)
    net.apply_to()
    net.to(torch.float64).eval()
    _check_forward(model, case)


@pytest.mark.parametrize("kind", ["loha", "loha_tucker", "lokr_factored", "lokr_tucker", "locon_tucker"])
def test_bypass_forward_agrees(kind: str, case_of: Callable[[str], LycorisCase]) -> None:
    case = case_of(kind)
    model = _double_model()
    net = _network_from_spec(kind, model, bypass_mode=True)
    assert all(m.bypass_mode for m in net.loras)
    _load_float64(net, case)
    net.eval()
    _check_forward(model, case)


def test_loader_defects_4_1_3(case_of: Callable[[str], LycorisCase]) -> None:
    """create_lycoris_from_weights cannot rebuild these two files (so the fixtures use load_weights)."""
    import lycoris

    for kind, err in (("locon_dora_in", RuntimeError), ("lokr_tucker", AttributeError)):
        with lb._lycoris_targets(), pytest.raises(err):
            lycoris.create_lycoris_from_weights(1.0, str(case_of(kind).lora_file), _double_model())


# --------------------------------------------------------------------------- the merge_to bug


_PRECISE_CRASHES = ("loha", "loha_tucker", "lokr_factored")


@pytest.mark.parametrize("kind", ["loha", "loha_tucker", "lokr_factored", "lokr_tucker", "locon_tucker", "full"])
@pytest.mark.parametrize("precise", [False, True])
def test_merge_to_scales_loha_and_lokr_twice(kind: str, precise: bool, case_of: Callable[[str], LycorisCase]) -> None:
    """lycoris-lora 4.1.3: merge_to -> get_merged_weight -> get_diff_weight multiplies get_weight()
    (already scaled) by the scale again for LoHa and LoKr (loha.py L230-235, lokr.py L381-386).

    So the merged weight is W0 + scale·ΔW_true: wrong wherever scale != 1, right where
    scale == 1 (LoKr with W1 and W2 full). LoCon and full merge to the truth.
    merge_to(precise=True) goes through get_diff_weight(shape=None) (base.py L561-587), which
    for a non-tucker LoHa/LoKr conv is the flat (out, in·kh·kw) matrix: it raises there.
    """
    case = case_of(kind)
    model = _double_model()
    net = _network_from_spec(kind, model)
    _load_float64(net, case)
    net.restore()  # plain layers again (full: its original weight back), then merge into them
    if precise and kind in _PRECISE_CRASHES:
        with pytest.raises(RuntimeError):
            net.merge_to(1.0, precise=True)
        return
    net.merge_to(1.0, precise=precise)
    base = case.base_tensors()
    twice = case.name in ("loha", "loha_tucker", "lokr_factored", "lokr_tucker")
    for path, mod in case.modules.items():
        w = model.get_submodule(path).weight.detach().numpy()
        w0 = base[f"{path}.weight"]
        if twice:
            np.testing.assert_allclose(w, w0 + mod.scale * mod.delta, rtol=0, atol=1e-12)
        if twice and mod.scale != 1.0:
            assert np.abs(w - mod.merged).max() > 1e-3, path
        else:
            np.testing.assert_allclose(w, mod.merged, rtol=0, atol=1e-12)
