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
from passes.fuse_ort import FuseForOnnxRuntime
from passes.fuse_warp import WarpToGridSample
from passes.manager import PassFailed, PassManager, PassRecord
from passes.precision import ConvertToFloat16

__all__ = [
    "ConvertToFloat16",
    "DeduplicateInitializers",
    "EliminateCommonSubexpressions",
    "FoldConstants",
    "FuseForOnnxRuntime",
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
