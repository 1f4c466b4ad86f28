"""`kiln serve` on Ray Serve: one application per engine (one replica per GPU, or CPU replicas where there
is none), autoscaled by Ray Serve, each the HTTP ingress of its own routes under /v2/models/NAME, and a
small application for the server's routes (/v2, /v2/health/...).

Why each engine's replicas take their HTTP requests themselves, with no gateway in front: on an H100 a
gateway replica that parsed each request and forwarded it through a handle capped DiT-XL/2 256² b8 at
about 85 requests a second, 40% under the engine run in a loop; the extra hop was the serial stage.
Ray Serve's proxy does the routing, the queueing and the backpressure.

The bounded queue is Ray Serve's own: a replica takes `max_ongoing_requests`, the proxy queues at most
`max_queued_requests` more for the engine, and past that answers 503 with Retry-After at once.
A replica that dies under a request fails it with Ray's 500 and its reason; a job's output is staged, so
the client can send it again and it is written once. Shutdown: the health routes say not ready, then
each engine's application is deleted, which lets its replicas finish what they hold while the proxy
refuses new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import time
from pathlib import Path

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.context import _get_global_client
from starlette.requests import Request
from starlette.responses import Response

from kiln.optimizer import __version__
from kiln.optimizer.errors import InputError
from kiln.optimizer.serve.job_requests import KINDS, Roots
from kiln.optimizer.serve.ray_start import check_room as check_ray_room, init_ray
from kiln.optimizer.serve.protocol import EXTENSIONS, HEADER_LENGTH, ProtocolError, check_outputs, encode_infer, error_body, model_metadata, parse_infer
from kiln.optimizer.serve.worker import EngineWorker

APP = "kiln"  # the server's routes; each engine's application is kiln-NAME
RETRY_AFTER_S = 1  # what a refused client is told to wait


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing: float = 2.0  # per replica, for the autoscaler
    # Per replica. Requests past it wait in Ray's router, which polls with backoff: with 16 clients, 8 gave
    # 80-95 requests/s and 32 gave 123-125 (benchmarks/serve_gpu.py ongoing, 2 cores; an H100 fell likewise).
    max_ongoing: int = 32
    max_queued: int = 16  # per engine, past what its replicas hold
    max_body: int = 64 << 20
    batch_wait_s: float = 0.002  # 0: no batching
    replica_cpus: float = 1.0  # a CPU engine's replica; a GPU engine's takes one GPU
    drain_timeout_s: float = 30.0  # how long a replica going away may finish what it holds
    roots: Roots | None = None


def engine_app(name: str) -> str:
    return f"{APP}-{name}"


class Model:
    """An engine's replica and the HTTP side of its routes: EngineWorker on one thread, its tensor
    requests batched by Ray Serve."""

    def __init__(self, name: str, engine_dir: str, metadata: dict, roots: Roots | None, batch_wait_s: float, max_body: int):
        self.name, self.metadata, self.max_body = name, metadata, max_body
        self.worker = EngineWorker(Path(engine_dir), roots)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.infer_batched.set_max_batch_size(self.worker.batch_max if batch_wait_s > 0 else 1)
        self.infer_batched.set_batch_wait_timeout_s(batch_wait_s)

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def infer_batched(self, many: list[dict]) -> list[dict]:
        return await self._on_engine(self.worker.infer, many)

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ProtocolError as exc:
            return _error(exc.message, exc.status)

    async def _route(self, request: Request) -> Response:
        prefix = f"/v2/models/{self.name}"
        action = [p for p in request.url.path.removeprefix(prefix).split("/") if p]
        if action[:1] == ["versions"]:  # one version, "1", of each model
            if action[1:2] != ["1"]:
                raise ProtocolError(f"model {self.name!r} has one version, 1", 404)
            action = action[2:]
        method = request.method
        if method == "GET" and action == []:
            return _json(self.metadata)
        if method == "GET" and action == ["ready"]:  # this replica answers: it loaded and ran its engine
            return _json({"name": self.name, "ready": True})
        if method == "GET" and action == ["stats"]:
            replica = serve.get_replica_context().replica_id.unique_id  # stats are per replica: say which
            return _json({"replica": replica, **self.worker.startup, "runs": self.worker.runs, "items": self.worker.items})
        if method == "POST" and action == ["infer"]:
            return await self._infer(request)
        if method == "POST" and len(action) == 1 and action[0] in KINDS:
            spec = _json_object(await _body(request, self.max_body))
            return _json(await self._on_engine(self.worker.job, action[0], spec))
        raise ProtocolError(f"no such path {method} {request.url.path}", 404 if method == "GET" else 405)

    async def _infer(self, request: Request) -> Response:
        body = await _body(request, self.max_body)
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not header.isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a whole number, got {header!r}")
        parsed = parse_infer(body, None if header is None else int(header))
        check_outputs(parsed, [o["name"] for o in self.metadata["outputs"]])
        self.worker.check(parsed.inputs)
        content, headers = encode_infer(self.name, parsed, await self.infer_batched(parsed.inputs))
        return Response(content, headers=headers)


class Health:
    """The server's routes: its metadata, live and ready (every engine has a running replica, and the
    server is not shutting down), and a 404 naming the models for any other path under /v2."""

    def __init__(self, names: list[str]):
        self.names, self.draining = names, False

    def drain(self) -> None:
        self.draining = True

    async def __call__(self, request: Request) -> Response:
        rest = [p for p in request.url.path.split("/") if p][1:]
        if request.method == "GET" and rest == []:
            return _json({"name": "kiln", "version": __version__, "extensions": EXTENSIONS})
        if request.method == "GET" and rest == ["health", "live"]:
            return _json({"live": True})
        if request.method == "GET" and rest == ["health", "ready"]:
            ready = not self.draining and await self._running()
            return _json({"ready": ready}, 200 if ready else 503)
        if rest[:1] == ["models"] and len(rest) > 1:
            return _error(f"no model {rest[1]!r}; this server has {', '.join(sorted(self.names))}", 404)
        return _error(f"no such path {request.url.path}; kiln serves the Open Inference Protocol under /v2", 404)

    async def _running(self) -> bool:
        """Asked of Ray Serve's controller, not the replicas, so a busy engine is still ready."""
        status = await asyncio.get_running_loop().run_in_executor(None, serve.status)
        for name in self.names:
            app = status.applications.get(engine_app(name))
            deployment = app and app.deployments.get("model")
            if not deployment or deployment.replica_states.get("RUNNING", 0) < 1:
                return False
        return True


async def _body(request: Request, max_body: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ProtocolError(f"the body is {int(declared)} bytes, over --max-body {max_body}")
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ProtocolError(f"Content-Encoding {request.headers['content-encoding']} is not supported; send the body uncompressed")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ProtocolError(f"the body is over --max-body {max_body} bytes")
    return bytes(body)


def _json(body, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _error(message: str, status: int) -> Response:
    headers = {"retry-after": str(RETRY_AFTER_S)} if status == 503 else {}
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the job's JSON does not parse: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError('a job is a JSON object with "input" and "output"')
    return value


def replica_resources(config, options: ServeOptions) -> dict[str, float]:
    """What Ray reserves for one replica: a whole GPU and a CPU to feed it, or --replica-cpus."""
    return {"num_gpus": 1, "num_cpus": 1} if config.device == "cuda" else {"num_cpus": options.replica_cpus}


def check_room(configs: dict, options: ServeOptions, address: str | None, say) -> None:
    """MIN replicas of every engine must fit the cluster (a replica Ray cannot place never starts, and
    the server would wait for it); MAX that does not fit is a warning."""
    per_round = [replica_resources(config, options) for config in configs.values()]
    gpus, cpus = (sum(r.get(key, 0) for r in per_round) for key in ("num_gpus", "num_cpus"))
    hint = "lower --replicas (a GPU engine's replica takes a whole GPU) or --replica-cpus, or join a larger cluster with --address"
    what = f"--replicas {options.min_replicas} of {len(configs)} engine(s) ({options.min_replicas * len(configs)} replicas)"
    check_ray_room(what, options.min_replicas * gpus, options.min_replicas * cpus, hint, address is None, say)
    if options.max_replicas > options.min_replicas:
        what = f"--replicas ..{options.max_replicas} of {len(configs)} engine(s) ({options.max_replicas * len(configs)} replicas)"
        check_ray_room(what, options.max_replicas * gpus, options.max_replicas * cpus, hint, False, say)


def engine_deployment(name: str, directory: Path, config, options: ServeOptions):
    """The Ray Serve application of one engine: its Model deployment, placed and scaled."""
    resources = replica_resources(config, options)
    fixed = options.min_replicas == options.max_replicas
    scaling = {"num_replicas": options.min_replicas} if fixed else {"autoscaling_config": {
        "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
        "target_ongoing_requests": options.target_ongoing, "upscale_delay_s": 3, "downscale_delay_s": 30}}  # fmt: skip
    deployment = serve.deployment(Model).options(
        name="model", ray_actor_options=resources, max_ongoing_requests=options.max_ongoing, max_queued_requests=options.max_queued,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        graceful_shutdown_timeout_s=options.drain_timeout_s, health_check_period_s=2, **scaling,
    )  # fmt: skip
    return deployment.bind(name, str(directory), model_metadata(name, config), options.roots, options.batch_wait_s, options.max_body)


def start(engines: dict[str, Path], configs: dict, options: ServeOptions, host: str, port: int, timeout_s: float, address: str | None,
          say=lambda text: None):  # fmt: skip
    """Start (or join) Ray, run the applications and wait until every replica is up; return the health
    application's handle and the seconds taken."""
    import ray

    started = time.perf_counter()
    init_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    if any(configs[name].device == "cuda" for name in engines) and gpus < 1:
        ray.shutdown()
        raise InputError("the engines run on a GPU, and the Ray cluster has none" + ("" if address else " (Ray found no GPU on this machine)"),
                         hint="run kiln serve where Ray sees a GPU, or join a cluster that has one with --address")  # fmt: skip
    check_room(configs, options, address, say)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s}, logging_config={"log_level": "WARNING"})
    running = _get_global_client().http_config  # Serve already up on a cluster keeps its own address
    if (running.host, running.port) != (host, port):
        raise InputError(f"Ray Serve already runs on this cluster, listening on {running.host}:{running.port}, not {host}:{port}",
                         hint=f"pass --host {running.host} --port {running.port}, or stop that Serve instance (`serve shutdown`)")  # fmt: skip
    for name, directory in engines.items():
        serve.run(engine_deployment(name, directory, configs[name], options), name=engine_app(name), route_prefix=f"/v2/models/{name}")
    health = serve.run(serve.deployment(Health).options(name="health", ray_actor_options={"num_cpus": 0}).bind(list(engines)),
                       name=APP, route_prefix="/v2")  # fmt: skip
    return health, time.perf_counter() - started


def stop(health, names: list[str], owns_ray: bool) -> None:
    """Say not ready, then delete each engine's application: Ray Serve stops routing to its replicas
    and lets them finish what they hold (up to their graceful shutdown timeout)."""
    import ray

    try:
        health.drain.remote().result()
        for name in names:
            serve.delete(engine_app(name))
    finally:
        serve.delete(APP)
        if owns_ray:
            serve.shutdown()
            ray.shutdown()


def replicas_range(text: str) -> tuple[int, int]:
    """--replicas N or MIN..MAX."""
    low, _, high = text.partition("..")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--replicas takes N or MIN..MAX (whole numbers), got {text!r}") from None
    if not 1 <= low_n <= high_n:
        raise ValueError(f"--replicas {text}: need 1 <= MIN <= MAX")
    return low_n, high_n
