"""A kiln engine as a Triton Python-backend model. `kiln export triton --backend python` copies this file
into the model's version folder as model.py, beside the engine directory (engine/).

It runs the engine with kiln's runtime, as `kiln serve` does: alignment padding (FILM takes any H×W),
CUDA graphs, several profiles, requests checked against the shapes the engine was verified at. Triton's
dynamic batcher hands execute() several requests; kiln stacks those of one shape along the batch dim,
up to the engine's batch max, and runs them together.
"""

import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Under `kiln serve --frontend triton`, the import path of the kiln process that started the server
# (Triton's Python stub ignores PYTHONPATH); in a Triton of your own, kiln is installed where it runs.
sys.path[:0] = [p for p in os.environ.get("KILN_SYS_PATH", "").split(os.pathsep) if p and p not in sys.path]


class TritonPythonModel:
    def initialize(self, args):
        # One instance per GPU: Triton says which; kiln's runtime runs on the first GPU it sees.
        if args.get("model_instance_kind") == "GPU" and args.get("model_instance_device_id", "0") != "0":
            os.environ["CUDA_VISIBLE_DEVICES"] = args["model_instance_device_id"]
        from kiln.optimizer.serve.protocol import ProtocolError
        from kiln.optimizer.serve.worker import EngineWorker

        self.refused = ProtocolError
        self.worker = EngineWorker(Path(args["model_repository"]) / args["model_version"] / "engine")
        self.inputs = [spec.name for spec in self.worker.engine.inputs]
        self.outputs = [spec.name for spec in self.worker.engine.outputs]

    def execute(self, requests):
        feeds, errors = [], {}
        for i, request in enumerate(requests):
            feeds.append({name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs})
            try:
                self.worker.check(feeds[-1])
            except self.refused as exc:
                errors[i] = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        good = [i for i in range(len(requests)) if i not in errors]
        try:
            results = dict(zip(good, self.worker.infer([feeds[i] for i in good]), strict=True))
        except Exception as exc:  # the engine failed: every request of the batch says why
            errors.update({i: pb_utils.TritonError(f"the engine failed: {exc}") for i in good})
        return [
            pb_utils.InferenceResponse(error=errors[i]) if i in errors
            else pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(results[i][n])) for n in self.outputs])
            for i in range(len(requests))
        ]  # fmt: skip
