"""Flux overflows float16: bf16 is its default where the target runs bf16, fp16 is refused unless forced, and
the report says why. The model's class reaches `kiln optimize` through the ONNX metadata the diffusers
importer writes."""

from __future__ import annotations

import json

import onnx
import pytest

from kiln import targets
from kiln.optimizer.cli import main
from kiln.optimizer.config import Options
from kiln.optimizer.errors import InputError
from kiln.optimizer.precision_policy import CLASS_METADATA_KEY, FP16_OVERFLOWS, apply_precision_policy

FLUX = "FluxTransformer2DModel"


def test_bf16_is_flux_default_where_the_target_runs_it():
    options = Options()
    note = apply_precision_policy(options, targets.CUDA.precisions, FLUX)
    assert options.precision == "bf16"
    assert note.startswith("precision bf16, FluxTransformer2DModel's default on this target") and "9096" in note


def test_a_chosen_precision_or_a_target_without_bf16_keeps_fp32():
    chosen = Options(precision_chosen=True)
    assert apply_precision_policy(chosen, targets.CUDA.precisions, FLUX) is None and chosen.precision == "fp32"
    cpu = Options()
    assert apply_precision_policy(cpu, targets.CPU.precisions, FLUX) is None and cpu.precision == "fp32"
    other = Options()
    assert apply_precision_policy(other, targets.CUDA.precisions, "SD3Transformer2DModel") is None
    assert other.precision == "fp32"


def test_fp16_is_refused_for_flux_unless_forced():
    with pytest.raises(InputError) as refused:
        apply_precision_policy(Options(precision="fp16", precision_chosen=True), targets.CUDA.precisions, FLUX)
    assert refused.value.message == f"kiln does not build {FLUX} in fp16: {FP16_OVERFLOWS[FLUX]}"
    assert "--force-precision" in refused.value.hint
    forced = Options(precision="fp16", precision_chosen=True, force_precision=True)
    assert apply_precision_policy(forced, targets.CUDA.precisions, FLUX).startswith("fp16 forced for")
    assert forced.precision == "fp16"


@pytest.fixture(scope="module")
def flux_labelled(tmp_path_factory):
    """kiln's example block, labelled as an export of Flux the way the diffusers importer labels one."""
    directory = tmp_path_factory.mktemp("flux")
    assert main(["example", "block", str(directory)]) == 0
    model = onnx.load(directory / "model.onnx")
    onnx.helper.set_model_props(model, {CLASS_METADATA_KEY: FLUX})
    onnx.save(model, directory / "model.onnx")
    return directory / "model.onnx"


def test_optimize_refuses_fp16_for_flux_and_builds_it_when_forced(capsys, flux_labelled, tmp_path):
    args = ["optimize", str(flux_labelled), "--target", "cpu", "--precision", "fp16", "--bench-runs", "0", "-q"]
    assert main([*args, "-o", str(tmp_path / "refused")]) == 2
    assert f"kiln: error: kiln does not build {FLUX} in fp16: Flux's activations" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "-o", str(tmp_path / "forced"), "--force-precision", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and report["source"]["class"] == FLUX
    assert any(note.startswith(f"fp16 forced for {FLUX}") for note in report["notes"])


def test_fp16_is_refused_for_flux_before_its_import(capsys, tmp_path):
    """The class comes from config.json before any export: a Flux directory without its weights is refused for
    fp16, not for the weights, and nothing is written."""
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "config.json").write_text(json.dumps({"_class_name": FLUX, "in_channels": 64}))
    args = ["optimize", str(tmp_path / "flux"), "-o", str(tmp_path / "out"), "--target", "cpu", "--precision", "fp16", "-q"]
    assert main(args) == 2
    assert f"kiln: error: kiln does not build {FLUX} in fp16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("recipe", "flags", "chosen"), [
    ("", [], False), ("", ["--precision", "fp32"], True), ('precision = "fp16"\n', [], True),
])  # fmt: skip
def test_a_precision_counts_as_chosen_from_the_command_line_or_a_recipe(tmp_path, recipe, flags, chosen):
    from kiln.optimizer.cli import build_parser, options_from_args

    (tmp_path / "recipe.toml").write_text(recipe)
    args = build_parser().parse_args(["optimize", "m.onnx", "-o", "out", "--config", str(tmp_path / "recipe.toml"), *flags])
    assert options_from_args(args).precision_chosen is chosen
