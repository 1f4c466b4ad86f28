"""The diffusers importer: tiny seeded models saved with save_pretrained, loaded, exported with torch.onnx
and checked against PyTorch at every profile corner and one shape off the corners."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

import onnx  # noqa: E402

from kiln.optimizer.examples.tiny_diffusers import TINY, tiny_model, write_dit, write_model, write_vae  # noqa: E402
from kiln.optimizer.errors import InputError  # noqa: E402
from kiln.optimizer.importers import diffusers as D  # noqa: E402
from kiln.optimizer.importers import diffusion_adapters as A  # noqa: E402
from kiln.optimizer.shapes import DIM_RULES_METADATA_KEY, SHAPES_METADATA_KEY  # noqa: E402
from kiln.targets import DimRange  # noqa: E402

# class -> (ONNX input names, ONNX dims of each input, the output's dims)
EXPECTED = {
    "DiTTransformer2DModel": (
        {"hidden_states": ["batch", 4, "height", "height"], "timestep": ["batch"], "class_labels": ["batch"]},
        ["batch", 4, "height", "height"],
    ),
    "PixArtTransformer2DModel": (
        {"hidden_states": ["batch", 4, "height", "width"], "encoder_hidden_states": ["batch", "text_len", 12],
         "timestep": ["batch"]},
        ["batch", 8, "height", "width"],
    ),
    "SD3Transformer2DModel": (
        {"hidden_states": ["batch", 4, "height", "width"], "encoder_hidden_states": ["batch", "text_len", 12],
         "pooled_projections": ["batch", 10], "timestep": ["batch"]},
        ["batch", 4, "height", "width"],
    ),
    "CogVideoXTransformer3DModel": (
        {"hidden_states": ["batch", "frames", 4, "height", "width"], "encoder_hidden_states": ["batch", 6, 12],
         "timestep": ["batch"]},
        ["batch", "frames", 4, "height", "width"],
    ),
    "LatteTransformer3DModel": (
        {"hidden_states": ["batch", 4, 3, "height", "width"], "encoder_hidden_states": ["batch", "text_len", 12],
         "timestep": ["batch"]},
        ["batch", 8, 3, "height", "width"],
    ),
    "AutoencoderKL": (
        {"latent_sample": ["batch", 4, "height", "width"]},
        ["batch", 3, "2*height", "2*width"],
    ),
}  # fmt: skip


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _write(class_name: str, directory):
    if class_name == "DiTTransformer2DModel":
        return write_dit(directory)
    if class_name == "AutoencoderKL":
        return write_vae(directory)
    return write_model(class_name, directory)


@pytest.mark.parametrize("class_name", sorted(EXPECTED))
def test_load_export_verify(class_name, tmp_path):
    directory = _write(class_name, tmp_path / "model")
    assert D.is_diffusers_dir(directory)
    model = D.load(directory)
    reference = tiny_model(class_name)
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    adapter = A.adapter_for(model)
    ranges, notes = A.resolve_ranges(adapter, [])
    assert notes  # the defaults are named
    out = tmp_path / "model.onnx"
    record = D.export(model, adapter, ranges, out)
    assert record["exporter"] == "dynamo" and record["fallback_reason"] is None
    assert out.is_file() and (tmp_path / "model.onnx.data").is_file()  # weights as external data

    proto = onnx.load(str(out), load_external_data=False)
    inputs, output = EXPECTED[class_name]
    assert {v.name: _dims(v) for v in proto.graph.input} == inputs
    assert [v.name for v in proto.graph.input] == list(inputs)
    assert [v.name for v in proto.graph.output] == ["sample"]
    assert _dims(proto.graph.output[0]) == output
    assert all(v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64) for v in proto.graph.input)
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata[SHAPES_METADATA_KEY] == A.shapes_spec(ranges)
    assert json.loads(metadata[D.INT_RANGES_METADATA_KEY]) == adapter.int_ranges()

    checks = D.verify_against_torch(model, adapter, out, ranges)
    assert [c["label"] for c in checks] == ["min", "opt", "max", "off-corner"]
    for check in checks:
        assert check["passed"], check
        assert check["max_abs"] <= 1e-4 * max(1.0, check["max_ref"])
        assert check["max_ref"] > 0.1  # the output is not trivially zero
    corners = [c["sizes"] for c in checks[:3]]
    off = checks[3]["sizes"]
    for rule in adapter.dynamic_dims:  # the off-corner shape is none of min, opt, max in some dim
        r = ranges[rule.name]
        assert [c[rule.name] for c in corners] == [r.min, r.opt, r.max]
    assert off not in corners
    if "width" in off and adapter.rule("width").same_as is None:
        assert off["height"] != off["width"]  # corners are square; this shape is not


def test_dit_without_its_workaround_fails_with_the_shape_named(tmp_path):
    """DiT's forward takes the latent side from int(sqrt(tokens)), which tracing fixes: the check must catch it."""
    model = D.load(write_dit(tmp_path / "dit"))
    adapter = A.adapter_for(model)
    unpatched = dataclasses.replace(adapter, patches=())
    ranges, _ = A.resolve_ranges(unpatched, [])
    D.export(model, unpatched, ranges, tmp_path / "model.onnx")
    with pytest.raises(InputError) as info:
        D.verify_against_torch(model, unpatched, tmp_path / "model.onnx", ranges)
    message = str(info.value)
    assert message.startswith(
        "the ONNX export of DiTTransformer2DModel does not match PyTorch at batch=1, height=8, width=8 (min) "
        "(and at 3 more of 4 shapes): ONNX Runtime failed: "
    )


def test_import_diffusers_source_and_notes(tmp_path):
    directory = write_dit(tmp_path / "dit")
    options = types.SimpleNamespace(shapes=[("--shapes", "batch=1..2..3"), ("--shapes", "height=8..12..16")], seed=0)
    path, source, notes = D.import_diffusers(directory, tmp_path, options)
    assert path == tmp_path / "imported.onnx"
    assert source["format"] == "diffusers" and source["class"] == "DiTTransformer2DModel"
    assert source["exporter"] == "dynamo" and source["ranges"] == {"batch": "1..2..3", "height": "8..12..16"}
    assert source["int_ranges"] == {"class_labels": [0, 10], "timestep": [0, 1000]}
    assert source["timestep_max"] == 1000  # what sampling loops scale their timesteps to
    assert len(source["hash"]) == 64
    assert [c["label"] for c in source["torch_parity"]["shapes"]] == ["min", "opt", "max", "off-corner"]
    assert source["torch_parity"]["shapes"][-1]["sizes"] == {"batch": 2, "height": 10, "width": 10}
    assert any("unpatchify" in n for n in notes) and any("matches PyTorch at 4 shapes" in n for n in notes)
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert metadata[SHAPES_METADATA_KEY] == "batch=1..2..3,height=8..12..16"
    # What the profile lint holds a later build's profiles to (width follows height: DiT's latents are square).
    assert json.loads(metadata[DIM_RULES_METADATA_KEY]) == {"height": {"max": None, "min": None, "multiple": 2, "why": "its patch_size is 2"}}


def test_torchscript_fallback_is_recorded(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(D, "_dynamo_export", broken)
    model = D.load(write_vae(tmp_path / "vae"))
    adapter = A.adapter_for(model)
    ranges, _ = A.resolve_ranges(adapter, [])
    record = D.export(model, adapter, ranges, tmp_path / "model.onnx")
    assert record["exporter"] == "torchscript"
    assert record["fallback_reason"] == "the dynamo exporter failed: RuntimeError: no dynamo today"
    proto = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert [v.name for v in proto.graph.input] == ["latent_sample"] and [v.name for v in proto.graph.output] == ["sample"]
    assert _dims(proto.graph.input[0]) == ["batch", 4, "height", "width"]
    assert all(c["passed"] for c in D.verify_against_torch(model, adapter, tmp_path / "model.onnx", ranges))


def test_a_guard_torch_cannot_prove_is_checked_at_every_size(tmp_path):
    """torch.export refuses a range when it cannot prove a guard over it (torch 2.11 on Wan's step decoder:
    min(2w, 4w) == 2w). kiln exports again with the guards as asserts, which the ONNX graph drops, and keeps
    the export only if each holds at every size in the range."""
    import numpy as np
    import onnxruntime as ort
    from torch.export import Dim

    class Doubles(torch.nn.Module):
        def __init__(self, odd_sevens: bool):
            super().__init__()
            self.odd_sevens = odd_sevens

        def forward(self, *inputs):  # as kiln's wrapper takes them
            x, width = inputs[0], inputs[0].shape[-1]
            # (w·w) % 4 != 3 is true at every width, and sympy cannot prove it; w % 8 != 7 is false at 7
            return x * 2 if (width * width) % 4 != 3 and (not self.odd_sevens or width % 8 != 7) else x

    names = types.SimpleNamespace(input_names=["x"], outputs=("y",))
    x, dims = torch.randn(2, 8), [{1: Dim("width", min=2, max=64)}]
    program, fixes = D._dynamo_export(Doubles(False), [x], dims, names)
    assert fixes[0] == ("1 guard(s) torch could not prove over the ranges, checked at every size in them "
                        "(the first: ((L['inputs'][0].size()[1]*L['inputs'][0].size()[1]) % 4) != 3)")  # fmt: skip
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    at_5 = np.random.default_rng(0).standard_normal((2, 5), dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": at_5})[0], at_5 * 2)

    with pytest.raises(RuntimeError, match=r"; the guard Ne\(Mod\(s\d+, 8\), 7\) is false at \{'s\d+': 7\}$"):
        D._dynamo_export(Doubles(True), [x], dims, names)


def test_the_import_is_checked_on_the_gpu_only_for_a_gpu_target_on_a_machine_with_one(monkeypatch):
    import onnxruntime as ort

    assert D.check_providers("cpu") == D.CPU_CHECK
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.check_providers("h100") == D.CPU_CHECK
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert D.check_providers("cpu") == D.CPU_CHECK
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])  # onnxruntime, not -gpu
    assert D.check_providers("h100") == D.CPU_CHECK
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert D.check_providers("cuda") == (("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider")


def test_checks_that_fail_on_the_gpu_are_run_again_on_the_cpu(tmp_path, monkeypatch):
    """Here torch has no CUDA, so moving the model to the GPU fails, as a device error or running out of
    memory would on a GPU machine: the CPU decides, and the notes say so."""
    monkeypatch.setattr(D, "check_providers", lambda target: (("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"))
    options = types.SimpleNamespace(shapes=[], seed=0, target="cuda")
    _, source, notes = D.import_diffusers(write_vae(tmp_path / "vae"), tmp_path, options)
    assert source["checked_on"] == "cpu" and all(c["passed"] for c in source["torch_parity"]["shapes"])
    assert source["gpu_check_failed"] == "AssertionError: Torch not compiled with CUDA enabled"
    assert "the checks failed on the GPU and were run again on the CPU: AssertionError: Torch not compiled with CUDA enabled" in notes


def test_sharded_safetensors_load(tmp_path):
    directory = write_model("DiTTransformer2DModel", tmp_path / "dit", max_shard_size="20KB")
    assert len(list(directory.glob("*.safetensors"))) > 1
    assert (directory / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = D.load(directory)
    reference = tiny_model("DiTTransformer2DModel").state_dict()
    for (name, got), want in zip(model.state_dict().items(), reference.values(), strict=True):
        assert torch.equal(got, want), name


def test_pickle_weights_refused_unless_trusted(tmp_path):
    directory = tmp_path / "vae"
    tiny_model("AutoencoderKL").save_pretrained(str(directory), safe_serialization=False)
    assert not list(directory.glob("*.safetensors"))
    with pytest.raises(InputError) as info:
        D.load(directory)
    assert info.value.message == (
        f"{directory} holds its weights only as pickle files (diffusion_pytorch_model.bin); loading a pickle file "
        "can run arbitrary code, so kiln does not load them unless told to"
    )
    assert "--trust-pickle" in info.value.hint and "safetensors" in info.value.hint
    model = D.load(directory, trust_pickle=True)
    for got, want in zip(model.state_dict().values(), tiny_model("AutoencoderKL").state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_without_accelerate_the_hint_says_to_install_it(tmp_path, monkeypatch):
    # Wan keeps modules in float32, which diffusers loads only through accelerate; without it (diffusers'
    # own availability flag off, as in an environment without it) the load fails, and kiln says why.
    import importlib.util

    from diffusers.models import modeling_utils

    suite = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
             "text_dim": 16, "freq_dim": 256, "ffn_dim": 32, "num_layers": 1, "qk_norm": "rms_norm_across_heads"}  # fmt: skip
    directory = write_model("WanTransformer3DModel", tmp_path / "wan", config=suite)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(InputError) as info:
        D.load(directory)
    assert info.value.message.startswith(f"diffusers could not load WanTransformer3DModel from {directory}: ValueError")
    assert info.value.hint == "install accelerate (pip install accelerate; kiln-ml[torch] includes it)"


def test_ranges_checked_before_export(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("exported despite a bad range")

    monkeypatch.setattr(D, "export", never)
    directory = write_dit(tmp_path / "dit")
    options = types.SimpleNamespace(shapes=[("--shapes", "height=9..16..32")], seed=0)
    with pytest.raises(InputError) as info:
        D.import_diffusers(directory, tmp_path, options)
    assert info.value.message == (
        "--shapes 'height=9..16..32': DiTTransformer2DModel takes height in multiples of 2 "
        "(its patch_size is 2); 9 is not"
    )
    assert info.value.hint == "e.g. --shapes height=10..16..32"


def test_range_messages():
    dit = A.adapter_for(tiny_model("DiTTransformer2DModel"))
    with pytest.raises(InputError, match=r"^--shapes 'width=8..32': DiTTransformer2DModel takes width equal to height "
                                         r"\(its unpatchify assumes square latents\)"):  # fmt: skip
        A.resolve_ranges(dit, [("--shapes", "width=8..32")])
    with pytest.raises(InputError, match=r"^--shapes 'frames=1..4': DiTTransformer2DModel has no dim 'frames'"):
        A.resolve_ranges(dit, [("--shapes", "frames=1..4")])
    ranges, _ = A.resolve_ranges(dit, [("--shapes", "hidden_states:0=1..8"), ("recipe r.toml", "height=16..32")])
    assert ranges == {"batch": DimRange(1, 4, 8), "height": DimRange(16, 24, 32)}

    sd3 = A.adapter_for(tiny_model("SD3Transformer2DModel"))
    with pytest.raises(InputError) as info:
        A.resolve_ranges(sd3, [("--shapes", "height=8..16..64")])
    assert info.value.message == (
        "--shapes 'height=8..16..64': SD3Transformer2DModel takes height up to 32 (its patch_size is 2, and its "
        "positional table covers 16 patches a side (pos_embed_max_size)); 64 is more"
    )
    cog = A.adapter_for(tiny_model("CogVideoXTransformer3DModel"))
    with pytest.raises(InputError, match=r"takes text_len 6 only \(its joint positional embedding covers "
                                         r"max_text_seq_length = 6 text tokens\)"):  # fmt: skip
        A.resolve_ranges(cog, [("--shapes", "text_len=4..8")])


def test_export_sizes_avoid_the_config_size_and_one_patch():
    """Tracing at config.sample_size bakes DiT's stored positional table in; at one patch, tracing specialises 1."""
    dit = A.adapter_for(tiny_model("DiTTransformer2DModel"))  # sample_size 16, patch 2
    sizes = A.export_sizes(dit, {"batch": DimRange(1, 1, 1), "height": DimRange(2, 16, 16)})
    assert sizes["batch"] == 2 and sizes["height"] not in (16, 2) and sizes["height"] % 2 == 0


def test_pipeline_dir_refused_with_subfolders(tmp_path):
    pipeline = tmp_path / "pipe"
    write_dit(pipeline / "transformer")
    write_vae(pipeline / "vae")
    (pipeline / "scheduler").mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert D.is_diffusers_dir(pipeline)
    with pytest.raises(InputError) as info:
        D.load(pipeline)
    assert info.value.message == (
        f"{pipeline} is a diffusers pipeline (it has model_index.json); kiln optimizes one model of a pipeline at a time"
    )
    assert info.value.hint == (
        f"pass the subfolder of the model to optimize: {pipeline / 'transformer'}/ (DiTTransformer2DModel), "
        f"{pipeline / 'vae'}/ (AutoencoderKL)"
    )


def test_unknown_class_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FancyTransformer9DModel"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert D.is_diffusers_dir(tmp_path)
    with pytest.raises(InputError, match=r"names the class 'FancyTransformer9DModel', which is not a model class of"):
        D.load(tmp_path)


def test_not_a_diffusers_dir(tmp_path):
    assert not D.is_diffusers_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert not D.is_diffusers_dir(tmp_path)
    assert not D.is_diffusers_dir(tmp_path / "config.json")


def test_generic_adapter_exports_a_class_without_one(tmp_path):
    """SanaTransformer2DModel has no adapter; its inputs are guessed. Its linear attention divides by sum + 1e-15,
    which onnxscript's optimizer would fold to sum (NaN where a query is all zero) without _exact_rewrites."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    sana = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=16, patch_size=2)  # fmt: skip
    sana.save_pretrained(str(tmp_path / "sana"), safe_serialization=True)
    path, source, notes = D.import_diffusers(tmp_path / "sana", tmp_path, types.SimpleNamespace(shapes=[], seed=0))
    assert source["family"] == "generic" and source["exporter"] == "dynamo"
    assert source["inputs"] == ["hidden_states", "encoder_hidden_states", "timestep"]
    assert all(c["passed"] for c in source["torch_parity"]["shapes"])
    assert any("guessed" in n for n in notes)


def test_pixart_with_resolution_and_aspect_ratio(tmp_path):
    """PixArt-alpha at 1024 takes the image's resolution and aspect ratio (added_cond_kwargs) as two more inputs."""
    model = tiny_model("PixArtTransformer2DModel", use_additional_conditions=True, attention_head_dim=12,
                       cross_attention_dim=24)  # its size embeddings take a third of the width each  # fmt: skip
    adapter = A.adapter_for(model)
    assert adapter.input_names == ["hidden_states", "encoder_hidden_states", "timestep", "resolution", "aspect_ratio"]
    ranges, _ = A.resolve_ranges(adapter, [("--shapes", "batch=1..3"), ("--shapes", "height=8..16")])
    D.export(model, adapter, ranges, tmp_path / "model.onnx")
    checks = D.verify_against_torch(model, adapter, tmp_path / "model.onnx", ranges)
    assert len(checks) == 4 and all(c["passed"] for c in checks)


def test_unsupported_class_says_why():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    with pytest.raises(InputError, match=r"^kiln has no adapter for UNet2DModel yet"):
        A.adapter_for(unet)


def test_every_family_has_a_tiny_model():
    import diffusers_suite  # diffusers' own tiny configurations

    assert set(TINY) <= set(A.FAMILIES)
    suite = {case.class_name for case in diffusers_suite.TRANSFORMERS + diffusers_suite.VAES}
    assert set(A.all_families()) <= set(TINY) | suite
