"""plot.py: every kind of report renders to a real PNG, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lora_tools.linalg import spectrum
from lora_tools.errors import LoraToolsError
from lora_tools.inspect import AdapterSummary, Coverage, InspectReport, LayerReport, flag_layers, module_type
from lora_tools.render.plot import save_plot

# A matplotlib warning (missing glyph, singular limits, layout failure) is a plotting bug.
pytestmark = pytest.mark.filterwarnings("error")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LLAMA_MODULES = {  # module -> (path inside the block, (out, in)) for a Llama-like 4096/14336 model
    "q_proj": ("self_attn", (4096, 4096)),
    "k_proj": ("self_attn", (1024, 4096)),
    "v_proj": ("self_attn", (1024, 4096)),
    "o_proj": ("self_attn", (4096, 4096)),
    "gate_proj": ("mlp", (14336, 4096)),
    "up_proj": ("mlp", (14336, 4096)),
    "down_proj": ("mlp", (4096, 14336)),
}


def make_layer(name: str, sv: np.ndarray, *, depth: int | None, shape=(64, 64), alpha: float = 32.0,
               base_fro_norm: float | None = None) -> LayerReport:
    """A LayerReport whose figures are computed from `sv` the way inspect computes them."""
    sv = np.sort(np.asarray(sv, dtype=np.float64))[::-1]
    fro = float(np.sqrt(np.sum(sv**2)))
    return LayerReport(
        name=name, shape=list(shape), weight_shape=list(shape), kind="linear", rank=sv.size, alpha=alpha, scale=alpha / sv.size,
        fro_norm=fro, spectral_norm=float(sv[0]), singular_values=[float(s) for s in sv],
        energy_rank_90=spectrum.energy_rank(sv, 0.90), energy_rank_99=spectrum.energy_rank(sv, 0.99),
        effective_rank=spectrum.effective_rank(sv), stable_rank=spectrum.stable_rank(sv),
        dora=False, dtype="bf16", family=name if depth is None else name.replace(f".{depth}.", ".*."),
        module_type=module_type(name), depth=depth, base_fro_norm=base_fro_norm,
        relative_norm=None if base_fro_norm is None else fro / base_fro_norm,
    )


def make_report(layers: list[LayerReport], path: str = "/models/adapter_model.safetensors",
                fmt: str = "peft", base: str | None = None) -> InspectReport:
    flag_layers(layers)
    summary = AdapterSummary(
        path=path, format=fmt, n_layers=len(layers),
        n_params=sum(l.rank * (l.shape[0] + l.shape[1]) for l in layers), dtype="bf16",
        ranks=sorted({l.rank for l in layers}), alphas=sorted({l.alpha for l in layers}),
        use_rslora=False, use_dora=False, fan_in_fan_out=False,
        target_modules=sorted({l.module_type for l in layers}), base_model="meta-llama/Llama-3.1-8B",
        base=base, coverage=Coverage(len(layers) * 2, len(layers), 0, 0, [], []), training_metadata={},
    )
    return InspectReport(summary, layers)


def llama_report(n_blocks: int = 32, rank: int = 16, with_base: bool = False) -> InspectReport:
    """32 blocks × 7 modules of plausible spectra, with one outlier and one dead layer."""
    rng = np.random.default_rng(0)
    layers = []
    for depth in range(n_blocks):
        for j, (module, (block, shape)) in enumerate(LLAMA_MODULES.items()):
            decay = 1.5 + 3.0 * j / len(LLAMA_MODULES) + 2.0 * depth / n_blocks  # later = more spread
            size = (0.3 if block == "mlp" else 0.15) * (1 + depth / n_blocks) * rng.lognormal(0, 0.1)
            sv = size * np.exp(-np.arange(rank) / decay) * rng.lognormal(0, 0.05, rank)
            if (depth, module) == (17, "v_proj"):
                sv *= 25.0  # an outlier in its family
            if (depth, module) == (5, "o_proj"):
                sv[:] = 0.0  # a dead layer
            base = float(np.sqrt(shape[0] * shape[1]) * 0.02) if with_base else None
            layers.append(make_layer(f"base_model.model.model.layers.{depth}.{block}.{module}", sv,
                                     depth=depth, shape=shape, base_fro_norm=base))
    return make_report(layers, base="/models/Llama-3.1-8B" if with_base else None)


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # four panels of lines and text, not an empty canvas


def test_llama_32x7(tmp_path):
    report = llama_report()
    assert len(report.layers) == 224
    assert any("outlier" in l.flags for l in report.layers) and any("dead" in l.flags for l in report.layers)
    out = tmp_path / "plot_32x7.png"
    save_plot(report, out)
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["plot_32x7.png"]  # no temporary left behind


def test_relative_norms_with_base(tmp_path):
    out = tmp_path / "relative.png"
    save_plot(llama_report(n_blocks=4, with_base=True), str(out))
    assert_png(out)


def test_one_layer(tmp_path):
    sv = np.array([0.5, 0.1, 0.01, 0.0])  # one direction unused: zero, left off the log axis
    report = make_report([make_layer("model.layers.0.self_attn.q_proj", sv, depth=0)])
    save_plot(report, tmp_path / "one.png")
    assert_png(tmp_path / "one.png")


def test_rank_one_single_layer(tmp_path):
    report = make_report([make_layer("q_proj", np.array([2.0]), depth=None)])
    save_plot(report, tmp_path / "r1.png")
    assert_png(tmp_path / "r1.png")


def test_all_zero_adapter(tmp_path):
    layers = [make_layer(f"model.layers.{i}.mlp.{m}", np.zeros(8), depth=i)
              for i in range(3) for m in ("up_proj", "down_proj")]
    report = make_report(layers)
    assert all(l.flags == ["dead"] for l in report.layers)
    save_plot(report, tmp_path / "zero.png")
    assert_png(tmp_path / "zero.png")


def test_empty_report(tmp_path):
    save_plot(make_report([]), tmp_path / "empty.png")
    assert_png(tmp_path / "empty.png")


def test_kohya_names_without_depth(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_attn1_{m}"
             for b in range(3) for a in range(2) for m in ("to_q", "to_k", "to_v", "to_out_0")]
    names += [f"lora_unet_mid_block_attn_{m}" for m in ("to_q", "to_k", "to_v", "to_out_0")] * 2
    layers = [make_layer(n, rng.lognormal(-2, 0.5, 8), depth=None if "mid" in n else int(n.split("_")[4]))
              for n in names]
    report = make_report(layers, path="/loras/style.safetensors", fmt="kohya")
    save_plot(report, tmp_path / "kohya.png")
    assert_png(tmp_path / "kohya.png")


def test_unwritable_path_names_the_file(tmp_path):
    target = tmp_path / "missing_dir" / "out.png"
    with pytest.raises(LoraToolsError, match="out.png"):
        save_plot(llama_report(n_blocks=1), target)


def test_import_does_not_load_matplotlib():
    code = "import lora_tools.render.plot, sys; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
