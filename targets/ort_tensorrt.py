"""ONNX Runtime's TensorRT execution provider as a target variant: `NAME-ort-trt` for each GPU.

ONNX Runtime hands the graph to TensorRT, which builds an engine per subgraph at the first session on a
GPU and keeps it in the engine directory's cache (trt-cache/), with its timing cache beside it. The
optimization profile comes from kiln's profile (`trt_profile_min/opt/max_shapes`), the precision flags
from kiln's precision and quantization. The graph has standard ONNX ops only (no com.microsoft fusions:
TensorRT fuses itself).

NOT EXECUTED: TensorRT's libraries cannot be installed where kiln is built and tested, so no session of
this target has run. What is tested is everything up to the session: the options handed over and the
refusal where TensorRT is missing.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.targets.align import Alignment
from kiln.targets.gpu import fingerprint
from kiln.targets.manifest import BuildConfig, EngineError
from kiln.targets.ort import OrtTarget, write_deferred
from kiln.targets.profile import Profile

if TYPE_CHECKING:  # onnx is imported where a build needs it
    import onnx

CACHE_DIR = "trt-cache"  # inside the engine directory; resolved when the engine loads
NVINFER = "libnvinfer.so.10"  # what ONNX Runtime 1.31's TensorRT provider links against


def tensorrt_missing() -> str | None:
    """Why TensorRT's runtime library cannot be loaded here, or None."""
    try:
        ctypes.CDLL(NVINFER)
    except OSError:
        return f"TensorRT is not installed ({NVINFER} cannot be loaded); ONNX Runtime's TensorRT provider needs it"
    return None


@dataclasses.dataclass(frozen=True)
class OrtTensorRtTarget(OrtTarget):
    optimization_level: int = 3  # TensorRT's builder optimization level: 3 is its default; 5 searches longest

    def available(self) -> str | None:
        return super().available() or tensorrt_missing()

    def trt_options(self, profile: Profile, precision: str, quantized: str | None) -> dict[str, str]:
        """The provider's options for an engine of this profile and precision (quantized: its Q/DQ format)."""
        options = {
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": CACHE_DIR,
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": CACHE_DIR,
            "trt_builder_optimization_level": str(self.optimization_level),
            "trt_fp16_enable": str(int(precision == "fp16")),
            # INT8 Q/DQ is explicit quantization: the flag lets TensorRT run those layers in INT8, no table needed.
            # ONNX Runtime 1.31 has no FP8 flag: TensorRT reads FP8 Q/DQ nodes as they are.
            "trt_int8_enable": str(int(quantized == "int8")),
        }  # fmt: skip
        if precision == "bf16":  # an option since onnxruntime 1.23: older providers refuse the key
            options["trt_bf16_enable"] = "1"
        if profile.dims:
            options.update({f"trt_profile_{corner}_shapes": profile.shapes_text(corner) for corner in ("min", "opt", "max")})
        if profile.is_static():
            options["trt_cuda_graph_enable"] = "1"
        return options

    def build(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        """The model as given (TensorRT optimizes it when a session first loads it on the GPU) and its manifest."""
        reason = self.available()
        if reason:
            raise EngineError(f"target {self.name!r} cannot build here: {reason}", hint="`kiln targets` shows what runs here")
        return self._write(model_path, engine_dir, profile, precision, alignment, deferred=False)

    def defer(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str = "fp32",
              alignment: Alignment | None = None) -> BuildConfig:  # fmt: skip
        return self._write(model_path, engine_dir, profile, precision, alignment, deferred=True)

    def _write(self, model_path: Path, engine_dir: Path, profile: Profile, precision: str, alignment: Alignment | None,
               deferred: bool) -> BuildConfig:  # fmt: skip
        """The model and its manifest; a build (not deferred) also records this machine's GPU."""
        import onnx

        (engine_dir / CACHE_DIR).mkdir()
        quantized = qdq_format(onnx.load(model_path, load_external_data=False).graph)
        config = BuildConfig(
            target=self.name, model=model_path.name, device="cuda", providers=self.providers,
            provider_options=self.trt_options(profile, precision, quantized), precision=precision,
            # The provider captures a static engine as a CUDA graph (trt_cuda_graph_enable): one binding, one shape.
            tf32=False, cuda_graph=profile.is_static(), profile=profile, inputs=(), outputs=(), alignment=alignment, verified=not deferred,
        )  # fmt: skip
        return write_deferred(model_path, engine_dir, config, {} if deferred else fingerprint())


def qdq_format(graph: onnx.GraphProto) -> str | None:
    """The 8-bit format of the graph's QuantizeLinear nodes, "int8" or "fp8", or None without any. The
    type is the zero point's (an initializer or a Constant), else the output_dtype attribute; without
    either, QuantizeLinear gives uint8."""
    constants = {t.name: t.data_type for t in graph.initializer}
    constants.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    found = None
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dtype = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        dtype = dtype or next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
        if dtype in FP8_TYPES:
            return "fp8"
        found = "int8"
    return found


FP8_TYPES = {17, 18, 19, 20}  # onnx.TensorProto's FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ
