"""Precision by model family: where float16 cannot hold a model's activations, bf16 (float32's range) is its
default on targets that run bf16, and fp16 is refused unless the user forces it.

The model's class comes from the diffusers importer: in the source record of an import, and in the
exported ONNX's metadata (CLASS_METADATA_KEY) when an ONNX file is optimized later.
"""

from __future__ import annotations

from pathlib import Path

from kiln.optimizer.config import Options
from kiln.optimizer.errors import InputError

CLASS_METADATA_KEY = "kiln.model_class"

# Classes whose activations pass float16's largest value (65504) with their real weights, and the evidence.
FP16_OVERFLOWS = {
    "FluxTransformer2DModel": (
        "Flux's activations pass float16's range (65504) with its real weights, and its outputs turn to NaN "
        "(diffusers issue 9096; ComfyUI clamps Flux's activations when it runs float16, ComfyUI PR 8495)"
    ),
}


def declared_class(model_arg: Path) -> str | None:
    """The model's class as its files declare it, read before any import or load: a diffusers directory's
    config.json, or the class kiln's importer wrote into an ONNX file's metadata. None when neither says
    (or the files are unreadable: the import reports that)."""
    import onnx

    from kiln.optimizer.importers.diffusers import is_diffusers_dir, read_model_config
    from kiln.optimizer.onnx_files import find_model

    try:
        if is_diffusers_dir(model_arg):
            return read_model_config(model_arg)["_class_name"]
        proto = onnx.load(find_model(model_arg), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable input is the import's to report, with its own message
        return None
    return {p.key: p.value for p in proto.metadata_props}.get(CLASS_METADATA_KEY)


def apply_precision_policy(options: Options, target_precisions, model_class: str | None) -> str | None:
    """Set options.precision for model_class where kiln has a rule for it: bf16 when the user chose no
    precision and the target runs bf16; an InputError for fp16 unless options.force_precision. Returns a
    note for the report saying what was chosen and why, or None."""
    reason = FP16_OVERFLOWS.get(model_class or "")
    if reason is None:
        return None
    if options.precision == "fp16":
        if not options.force_precision:
            raise InputError(f"kiln does not build {model_class} in fp16: {reason}",
                             hint="use --precision bf16 (its default on GPU targets), or add --force-precision "
                                  "to build fp16 anyway")  # fmt: skip
        return f"fp16 forced for {model_class} (--force-precision), though {reason}"
    if options.precision_chosen or "bf16" not in target_precisions:
        return None
    options.precision = "bf16"
    return f"precision bf16, {model_class}'s default on this target (float32's range at half the bytes): {reason}"
