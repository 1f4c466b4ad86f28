"""`kiln serve` and `kiln batch`: their flags and handlers (kiln-ml[cluster]: Ray Serve and Ray Data)."""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
from pathlib import Path

from kiln.optimizer.errors import InputError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

SERVE_DESCRIPTION = """\
Serve engines over HTTP with the Open Inference Protocol (KServe v2, as Triton speaks it), on Ray Serve:
one deployment per engine, a replica per GPU (CPU replicas for a cpu engine), autoscaled between
--replicas MIN..MAX. tritonclient.http and other v2 clients work unchanged.

  GET  /v2/health/live, /v2/health/ready     ready once every engine is loaded and has run once
  GET  /v2/models/NAME                        inputs, outputs (-1: a dynamic dim) and kiln's profile
  POST /v2/models/NAME/infer                  JSON tensors, or the binary-tensor extension
  POST /v2/models/NAME/interpolate            {"input": "clip.mp4", "output": "smooth.mp4", "factor": 4}
  POST /v2/models/NAME/decode                 {"input": "latents.npy", "output": "frames"}

Jobs read under --input-root and write under --output-root (paths relative to them; `..` and links
out are refused), each output written whole under a temporary name and renamed at the end.
Requests of one shape are batched up to the engine's batch max. Past --max-queued requests waiting
for a replica, a request gets 503 with Retry-After at once. A replica that dies under a request fails
it with 500 and the reason (send it again: a job's output is never half-written). SIGINT or SIGTERM
drains: ready turns 503, requests in flight finish (up to --drain-timeout), new ones are refused,
then it exits 0.

--frontend triton serves the same engines on a real Triton Inference Server (PyTriton's tritonserver,
kiln-ml[triton]) instead: each engine a Python-backend model running kiln's runtime, --replicas N
instances, Triton's own HTTP (--port) and gRPC (--grpc-port) endpoints, dynamic batching and
/v2/models/NAME/stats. `kiln export triton` writes such a repository for a Triton you run yourself.

On an existing Ray cluster (`ray start --head` on one node, `ray start --address HEAD:6379` on the
others): kiln serve ... --address HEAD:6379; Ray places the replicas on the nodes' GPUs.
"""

BATCH_DESCRIPTION = """\
Run a manifest of clips (a FILM engine: interpolate) or latent files (a VAE decoder: decode) through
Ray Data, one actor per GPU (--workers CPU actors for a cpu engine), each loading the engine once.

MANIFEST is JSON lines, one job per line, paths relative to the manifest's folder:
  {"input": "clips/a.mp4", "factor": 4}
  {"input": "clips/b", "output": "b-smooth.mp4"}
  clips/c.mp4                                   a bare path: the job's defaults
Outputs go under OUT (default: the input's name; a video stays a video, frames go to a folder).
Rerun to resume: outputs that exist are whole and skipped. A worker that dies is restarted and its
job run again (--retries); no output is written twice or left half-written. OUT/batch.json lists
every job. Exit codes: 0 all done, 2 a bad manifest or some jobs failed on their input.
"""


def add_commands(sub, common, positive, size) -> None:
    p = sub.add_parser("serve", parents=[common], help="serve engines over HTTP (Open Inference Protocol) on Ray Serve",
                       description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("engines", nargs="+", metavar="[NAME=]ENGINE_DIR", help="OUTDIRs `kiln optimize` wrote; NAME defaults to the directory's name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", default="1", metavar="N|MIN..MAX", help="replicas per engine; a range autoscales on ongoing requests (default 1)")
    p.add_argument("--target-ongoing", type=positive(float), default=2.0, help="ongoing requests per replica the autoscaler aims at (default 2)")
    p.add_argument("--max-ongoing", type=positive(int), default=32, help="requests a replica holds at once, batching included (default 32)")
    p.add_argument("--max-queued", type=positive(int), default=16, help="requests waiting for a replica, per engine, before 503 (default 16)")
    p.add_argument("--max-body", type=size, default=64 << 20, metavar="SIZE", help="largest request body (default 64M); larger gets 400")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a replica waits to fill a batch (default 2; 0: no batching)")
    p.add_argument("--replica-cpus", type=positive(float), default=1.0, help="CPUs a cpu engine's replica takes (default 1)")
    p.add_argument("--input-root", type=Path, metavar="DIR", help="where jobs read (needs --output-root; no jobs without them)")
    p.add_argument("--output-root", type=Path, metavar="DIR", help="where jobs write")
    p.add_argument("--timeout", type=positive(float), default=300.0, help="seconds a request may take before 408 (default 300)")
    p.add_argument("--drain-timeout", type=positive(float), default=30.0, help="seconds to let requests in flight finish at shutdown (default 30)")
    p.add_argument("--address", help="an existing Ray cluster's address (HEAD:6379); default: start Ray on this machine")
    p.add_argument("--frontend", choices=("ray", "triton"), default="ray",
                   help="ray: Ray Serve (default); triton: a real Triton Inference Server (kiln-ml[triton]) running each engine "
                        "as a Python-backend model, with Triton's HTTP and gRPC endpoints, dynamic batching and statistics; "
                        "--replicas N are its instances")  # fmt: skip
    p.add_argument("--grpc-port", type=int, help="Triton's gRPC port (--frontend triton; default --port + 1)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("batch", parents=[common], help="run a manifest of clips or latent files through Ray Data, resumably",
                       description=BATCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("engine", type=Path, metavar="ENGINE_DIR", help="an OUTDIR `kiln optimize` wrote from FILM or a VAE decoder")
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="JSON lines, one job each (see above)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="folder the outputs and batch.json go to")
    p.add_argument("--workers", type=positive(int), help="actors (default: one per GPU of the cluster for a GPU engine, 1 for a cpu engine)")
    p.add_argument("--retries", type=int, default=3, help="times a job whose worker died is run again (default 3)")
    p.add_argument("--address", help="an existing Ray cluster's address (HEAD:6379); default: start Ray on this machine")
    p.set_defaults(handler=cmd_batch)


def _engine_config(path: Path):
    from kiln.optimizer.run import engine_dir, engine_errors
    from kiln.targets import read_manifest

    directory = engine_dir(path)
    with engine_errors():
        return directory, read_manifest(directory)


def _check_runs_here(config, directory: Path) -> None:
    """On this machine (no --address): an engine for another GPU, or a GPU engine without a GPU, exits 2
    here rather than as replicas Ray cannot start."""
    from kiln.optimizer.run import engine_errors
    from kiln.targets.engine import check_machine

    with engine_errors():
        if config.device == "cuda":
            check_machine(config, directory)


def _named(items: list[str]) -> dict[str, Path]:
    engines: dict[str, Path] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else (None, "", item)
        path = Path(path)
        name = name or (path.resolve().name if path.resolve().name != "engine" else path.resolve().parent.name)
        if not NAME.fullmatch(name):
            raise InputError(f"model name {name!r} is not a name a URL can carry", hint="give one with NAME=ENGINE_DIR (letters, digits, _ . -)")
        if name in engines:
            raise InputError(f"two engines are named {name!r}", hint="name them: kiln serve a=DIR1 b=DIR2")
        engines[name] = path
    return engines


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise InputError(f"port {port} is not a port to listen on", hint="give one from 1 to 65535")
    with socket.socket() as probe:
        # As servers bind: a port another server has just left (TIME_WAIT) is free; one listened on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}", hint="pick another --port, or stop what holds it") from None


def _progress(args):
    """A line of progress on stderr, flushed (a log sees it at once); nothing with -q."""
    return (lambda text: None) if args.quiet else (lambda text: print(f"kiln: {text}", file=sys.stderr, flush=True))


def cmd_serve(args) -> int:
    from kiln.optimizer.cli import _JSON_STDOUT
    from kiln.optimizer.lazy import check_installed

    if args.frontend == "triton":
        from kiln.optimizer.triton_cli import serve_triton

        return serve_triton(args, _named(args.engines))

    check_installed(["ray", "starlette"], "cluster", "kiln serve")
    from kiln.optimizer.serve import cluster
    from kiln.optimizer.serve.job_requests import Roots

    try:
        low, high = cluster.replicas_range(args.replicas)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if (args.input_root is None) != (args.output_root is None):
        raise InputError("jobs need both --input-root and --output-root", hint="give both, or neither for tensor requests only")
    if args.batch_wait_ms < 0:
        raise InputError(f"--batch-wait-ms must be 0 or more, got {args.batch_wait_ms}")
    roots = Roots.of(args.input_root, args.output_root) if args.input_root else None
    engines, configs = {}, {}
    for name, path in _named(args.engines).items():
        engines[name], configs[name] = _engine_config(path)
        if not args.address:
            _check_runs_here(configs[name], engines[name])
    if not args.address:  # on a cluster, Ray Serve's proxy may hold the port already (see cluster.start)
        _check_port(args.host, args.port)
    options = cluster.ServeOptions(min_replicas=low, max_replicas=high, target_ongoing=args.target_ongoing, max_ongoing=args.max_ongoing,
                                   max_queued=args.max_queued, max_body=args.max_body, batch_wait_s=args.batch_wait_ms / 1e3,
                                   replica_cpus=args.replica_cpus, drain_timeout_s=args.drain_timeout, roots=roots)  # fmt: skip
    say = _progress(args)
    say(f"starting {len(engines)} engine(s) on Ray Serve ({'replicas ' + args.replicas})")
    health = None
    try:
        health, seconds = cluster.start(engines, configs, options, args.host, args.port, args.timeout, args.address, say)
        base = f"http://{args.host}:{args.port}"
        ready = {"status": "ready", "url": base, "startup_s": seconds, "models": {n: f"{base}/v2/models/{n}" for n in engines}}
        text = "\n".join([f"ready in {seconds:.1f} s: {base}/v2/health/ready", *(f"  {n}: {u}" for n, u in ready["models"].items())])
        # One line with --json, flushed: a supervisor waits for it before sending traffic.
        print(json.dumps(ready) if args.json else text, file=_JSON_STDOUT.get() or sys.stdout, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if health is None:
            raise  # before the applications ran: an interrupted start
        say("draining: requests in flight finish, new ones are refused")
        cluster.stop(health, list(engines), owns_ray=not args.address)
        say("stopped")
        return 0


def cmd_batch(args) -> int:
    from kiln.optimizer.cli import _emit
    from kiln.optimizer.lazy import check_installed
    from kiln.optimizer.outdir import atomic_file

    check_installed(["ray", "pandas", "pyarrow"], "cluster", "kiln batch")
    from kiln.optimizer.serve import batch

    directory, config = _engine_config(args.engine)
    if not args.address:
        _check_runs_here(config, directory)
    if args.retries < 0:
        raise InputError(f"--retries must be 0 or more, got {args.retries}")
    summary = batch.run(directory, config, args.manifest, args.output, args.workers, args.retries, args.address, _progress(args))
    with atomic_file(args.output / "batch.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    failed = [r for r in summary["jobs"] if r["status"] == "failed"]
    text = (f"{summary['done']} done, {summary['skipped']} skipped (done before), {summary['failed']} failed: "
            f"{summary['frames']} frames in {summary['wall_s']:.1f} s ({summary['fps']:.1f} fps) to {args.output}")  # fmt: skip
    _emit(args, summary, text)
    if failed:
        print(f"kiln: error: {len(failed)} job(s) failed; line {failed[0]['line']}: {failed[0]['error']}\n"
              "  hint: fix those inputs and rerun: the jobs done are skipped", file=sys.stderr)  # fmt: skip
        return 2
    return 0
