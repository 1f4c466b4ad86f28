"""Graph passes over onnx-ir models. Passes never print; the PassManager records what they did."""

from kiln.passes.base import KilnPass, count_nodes, op_counts
from kiln.passes.cleanup import (
    DeduplicateInitializers,
    EliminateCommonSubexpressions,
    FoldConstants,
    InferShapes,
    LiftConstants,
    RemoveDeadNodes,
    RemoveIdentity,
    SortTopologically,
    cleanup_passes,
)
from kiln.passes.fuse_adaln import FuseAdaLnModulation
from kiln.passes.fp8_gemm import LowerFp8Gemm
from kiln.passes.fuse_ort import FuseForOnnxRuntime
from kiln.passes.fuse_warp import WarpToGridSample
from kiln.passes.fusion import FuseStandardOnnx
from kiln.passes.manager import PassFailed, PassManager, PassRecord
from kiln.passes.precision import ConvertPrecision, ConvertToFloat16
from kiln.passes.quantize import QuantConfig, Quantize
from kiln.passes.static_shapes import ForgetSymbolicShapes, FreezeShapes

__all__ = [
    "ConvertPrecision",
    "ConvertToFloat16",
    "DeduplicateInitializers",
    "EliminateCommonSubexpressions",
    "FoldConstants",
    "ForgetSymbolicShapes",
    "FreezeShapes",
    "FuseAdaLnModulation",
    "FuseForOnnxRuntime",
    "FuseStandardOnnx",
    "InferShapes",
    "KilnPass",
    "LiftConstants",
    "LowerFp8Gemm",
    "PassFailed",
    "PassManager",
    "PassRecord",
    "QuantConfig",
    "Quantize",
    "RemoveDeadNodes",
    "RemoveIdentity",
    "SortTopologically",
    "WarpToGridSample",
    "cleanup_passes",
    "count_nodes",
    "op_counts",
]
