"""`kiln export triton` and `kiln serve --frontend triton` (kiln-ml[triton]: PyTriton's tritonserver)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kiln.optimizer.errors import InputError

EXPORT_DESCRIPTION = """\
Write a built engine as a model of a Triton Inference Server model repository:

  REPO/NAME/config.pbtxt   names, data types and dims from the engine (a dynamic leading batch becomes
                           max_batch_size, other dynamic dims -1), dynamic batching preferring the
                           profile's opt and max batch, one instance per GPU (or CPU)
  REPO/NAME/N/             the version: what the backend loads

Backends (--backend; default: the engine's own runtime):
  onnxruntime   platform onnxruntime_onnx: model.onnx, or the folder model.onnx/ with its external data;
                a target on ONNX Runtime's TensorRT provider gets Triton's tensorrt accelerator options
  tensorrt      platform tensorrt_plan: model.plan; give one engine per GPU and each plan is chosen
                by compute capability (cc_model_filenames)
  python        Triton's Python backend running the engine with kiln's runtime (model.py + engine/):
                FILM's alignment padding, CUDA graphs and several profiles, which a plain backend lacks

An existing version is refused unless --force replaces it; other versions are left as they are.
Served for real in kiln's tests: the python backend, on the tritonserver PyTriton ships. That binary
has no ONNX Runtime or TensorRT backend, so those configs are checked against Triton's schema only.

Examples:
  kiln export triton dit-out/ models --name dit
  kiln export triton film-out/ models --name film --backend python
  kiln export triton h100-out/ l40s-out/ models --name dit_trt      (TensorRT plans, one per GPU)
  tritonserver --model-repository models
"""


def add_commands(sub, common, positive) -> None:
    p = sub.add_parser("export", help="export an engine for another server: a Triton model repository")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    t = formats.add_parser("triton", parents=[common], help="write a Triton Inference Server model repository entry",
                           description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t.add_argument("engines", nargs="+", type=Path, metavar="OUTDIR", help="what `kiln optimize -o` wrote; several: TensorRT plans of one model, one per GPU")
    t.add_argument("repo", type=Path, metavar="REPO", help="the model repository (made if missing)")
    t.add_argument("--name", help="the model's name (default: the OUTDIR's name)")
    t.add_argument("--version", type=int, default=1, help="the model version to write (default 1)")
    t.add_argument("--backend", choices=("onnxruntime", "tensorrt", "python"), help="Triton backend (default: the engine's runtime)")
    t.add_argument("--instances", type=positive(int), default=1, help="instances of the model per GPU, or on the CPU (default 1)")
    t.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long Triton waits to fill a batch (default 2)")
    t.add_argument("--force", action="store_true", help="replace the version if it exists")
    t.set_defaults(handler=cmd_export_triton)


def _engines(paths: list[Path]):
    from kiln.optimizer.cluster_cli import _engine_config

    return [_engine_config(path) for path in paths]


def _options(backend: str, instances: int, batch_wait_ms: float):
    from kiln.optimizer.triton.config import ExportOptions

    if batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms must be 0 or more, got {batch_wait_ms}")
    return ExportOptions(backend=backend, instances=instances, batch_wait_us=round(batch_wait_ms * 1000))


def cmd_export_triton(args) -> int:
    from kiln.optimizer.cli import _emit
    from kiln.optimizer.lazy import check_installed
    from kiln.optimizer.triton import repository
    from kiln.optimizer.triton.config import is_plan

    check_installed(["tritonclient", "grpc"], "triton", "kiln export triton")
    engines = _engines(args.engines)
    backend = args.backend or ("tensorrt" if is_plan(engines[0][1]) else "onnxruntime")
    name = args.name or repository.default_name(engines[0][0])
    version = repository.export(engines, args.repo, name, args.version, _options(backend, args.instances, args.batch_wait_ms), args.force)
    data = {"repository": str(args.repo), "model": name, "version": args.version, "backend": backend, "path": str(version)}
    _emit(args, data, f"wrote model {name!r} version {args.version} ({backend} backend) to {version}")
    return 0


def serve_triton(args, named: dict[str, Path]) -> int:
    """kiln serve --frontend triton: the engines exported as Python-backend models into a temporary
    repository, served by tritonserver until SIGINT or SIGTERM."""
    from kiln.optimizer.cli import _JSON_STDOUT
    from kiln.optimizer.cluster_cli import _check_port, _check_runs_here, _engine_config, _progress
    from kiln.optimizer.lazy import check_installed
    from kiln.optimizer.triton import repository, server

    check_installed(["tritonclient", "grpc", "pytriton"], "triton", "kiln serve --frontend triton")
    for flag, given in (("--address", args.address), ("--input-root", args.input_root), ("--output-root", args.output_root)):
        if given:
            raise InputError(f"{flag} is for the Ray front end; Triton's serves tensor requests on this machine", hint="leave it out, or use --frontend ray")
    if not args.replicas.isdigit() or int(args.replicas) < 1:
        raise InputError(f"--replicas {args.replicas}: Triton runs a fixed number of instances per engine", hint="give a number, e.g. --replicas 2")
    grpc_port = args.port + 1 if args.grpc_port is None else args.grpc_port
    if grpc_port == args.port:
        raise InputError(f"--grpc-port {grpc_port} is --port too", hint="give Triton's HTTP and gRPC endpoints two ports")
    for port in (args.port, grpc_port):
        _check_port(args.host, port)
    options = _options("python", int(args.replicas), args.batch_wait_ms)
    say = _progress(args)
    with tempfile.TemporaryDirectory(prefix="kiln-triton-") as work:
        repo, log = Path(work) / "repo", Path(work) / "tritonserver.log"
        for name, path in named.items():
            directory, config = _engine_config(path)
            _check_runs_here(config, directory)
            repository.export([(directory, config)], repo, name, 1, options, force=False)
        say(f"starting tritonserver with {len(named)} engine(s), {args.replicas} instance(s) each")
        start, ready = time.perf_counter(), None
        try:
            with server.running(repo, args.host, args.port, grpc_port, args.timeout, log, args.drain_timeout) as process:
                base = f"http://{args.host}:{args.port}"
                ready = {"status": "ready", "frontend": "triton", "url": base, "grpc": f"{args.host}:{grpc_port}",
                         "startup_s": time.perf_counter() - start, "models": {n: f"{base}/v2/models/{n}" for n in named}}  # fmt: skip
                text = "\n".join([f"ready in {ready['startup_s']:.1f} s: {base}/v2/health/ready (gRPC {ready['grpc']})",
                                  *(f"  {n}: {u}" for n, u in ready["models"].items())])  # fmt: skip
                print(json.dumps(ready) if args.json else text, file=_JSON_STDOUT.get() or sys.stdout, flush=True)
                code = process.wait()
                raise InputError(f"tritonserver exited with code {code}:\n{server.tail(log)}")
        except KeyboardInterrupt:
            if ready is None:
                raise  # an interrupted start
            say("stopped: tritonserver finished the requests in flight")
            return 0
