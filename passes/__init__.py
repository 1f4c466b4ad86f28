"""Graph passes over onnx-ir models. Passes never print; the PassManager records what they did."""

from passes.base import KilnPass, count_nodes, op_counts
from passes.cleanup import (
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
from passes.fuse_adaln import FuseAdaLnModulation
from passes.fuse_ort import FuseForOnnxRuntime, FuseStandardOnnx
from passes.fuse_warp import WarpToGridSample
from passes.manager import PassFailed, PassManager, PassRecord
from passes.precision import ConvertPrecision, ConvertToFloat16
from passes.static_shapes import FreezeShapes

__all__ = [
    "ConvertPrecision",
    "ConvertToFloat16",
    "DeduplicateInitializers",
    "EliminateCommonSubexpressions",
    "FoldConstants",
    "FreezeShapes",
    "FuseAdaLnModulation",
    "FuseForOnnxRuntime",
    "FuseStandardOnnx",
    "InferShapes",
    "KilnPass",
    "LiftConstants",
    "PassFailed",
    "PassManager",
    "PassRecord",
    "RemoveDeadNodes",
    "RemoveIdentity",
    "SortTopologically",
    "WarpToGridSample",
    "cleanup_passes",
    "count_nodes",
    "op_counts",
]
