"""Rotary embeddings of Flux and Wan, exported by kiln and frozen at one shape (as a CUDA-graph engine is),
become ONNX Runtime's RotaryEmbedding: every q and k rotation, with the outputs PyTorch gives."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import passes
from kiln.passes import FuseForOnnxRuntime, op_counts

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))  # fmt: skip
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)  # fmt: skip

# class, config, sizes, rotations (q and k of each attention), the rule
CASES = {
    "flux": ("FluxTransformer2DModel", FLUX, {"batch": 1, "height": 8, "width": 8, "text_len": 8}, 4, "rotary-flux"),
    "wan": ("WanTransformer3DModel", WAN, {"batch": 1, "frames": 3, "height": 8, "width": 12, "text_len": 8}, 2, "rotary-wan"),
}  # fmt: skip


def _export(name: str, folder: Path) -> tuple:
    """(model, adapter, export record, ONNX path) of a case."""
    from kiln.optimizer.importers.diffusers import export
    from kiln.optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges

    cls, config, *_ = CASES[name]
    torch.manual_seed(0)
    model = getattr(diffusers, cls)(**config).eval()
    adapter = adapter_for(model)
    path = folder / f"{name}.onnx"
    return model, adapter, export(model, adapter, resolve_ranges(adapter, [])[0], path), path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each case exported once for this module's tests."""
    folder = tmp_path_factory.mktemp("exports")
    return functools.cache(lambda name: _export(name, folder))


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotary_becomes_one_op_with_pytorch_outputs(name, exports, tmp_path):
    from kiln.optimizer.importers.diffusion_adapters import make_inputs

    _, _, sizes, rotations, rule = CASES[name]
    model, adapter, record, path = exports(name)
    graph = ir.load(path)
    graph, _ = passes.PassManager([passes.FreezeShapes(sizes), *passes.cleanup_passes()]).run(graph)
    fusion = FuseForOnnxRuntime()
    fusion(graph)
    counts = op_counts(graph)
    assert fusion.stats[rule] == rotations and counts["com.microsoft::RotaryEmbedding"] == rotations, counts
    assert "Neg" not in counts and "ScatterND" not in counts, counts
    if name == "wan":  # its strided writes (out[..., 0::2] = ...) were exported as one stack
        assert any(fix.startswith("2 pair(s) of strided writes") for fix in record["fixes"]), record["fixes"]
    ir.save(graph, tmp_path / "fused.onnx", external_data="fused.onnx.data")

    tensors = make_inputs(adapter, sizes, seed=1)
    with torch.no_grad():
        want = adapter.call(model, *tensors).numpy()
    session = ort.InferenceSession(tmp_path / "fused.onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {rule.name: t.numpy() for rule, t in zip(adapter.inputs, tensors, strict=True)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rotary_tables_computed_at_run_time_are_left_alone(exports):
    """A dynamic graph's sizes and tables are known only at run time: no rotation is fused, and the rule says why."""
    graph, _ = passes.PassManager(passes.cleanup_passes()).run(ir.load(exports("flux")[3]))
    fusion = FuseForOnnxRuntime()
    fusion(graph)
    assert "rotary-flux" not in fusion.stats
    why = "the input is not [batch, tokens, heads, pairs, 2] with its sizes known (only a static graph's are)"
    assert fusion.details["refused"]["rotary-flux"] == {why: 4}
