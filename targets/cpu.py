"""The CPU target: ONNX Runtime's CPU execution provider. Runs everywhere, and is what CI tests."""

from kiln.targets.ort import OrtTarget

CPU = OrtTarget(
    name="cpu",
    family="cpu",
    description="ONNX Runtime CPU execution provider",
    precisions=("fp32", "fp16"),
    capabilities=("dynamic-shapes", "contrib-ops", "external-data"),
    quantize=("int8",),
    providers=("CPUExecutionProvider",),
)
