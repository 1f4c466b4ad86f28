"""`kiln serve` on Ray Serve: one deployment per engine (one replica per GPU, or CPU replicas where there is
none), autoscaled by Ray Serve, behind one HTTP gateway that speaks the Open Inference Protocol.

Why a gateway in front of the engines rather than an HTTP route per engine: it parses and checks a
request before a replica sees it, turns Ray's backpressure into a 503 with Retry-After, retries a request
whose replica died on another one (a job's output is staged, so it never doubles), and drains on
shutdown. The engines' replicas only run work.

The bounded queue is Ray Serve's own: each engine deployment takes `max_ongoing_requests` per replica and
queues at most `max_queued_requests` more at its caller (the gateway); past that the handle raises
BackPressureError at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import signal
import time
from pathlib import Path

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import Response

from kiln.optimizer import __version__
from kiln.optimizer.errors import InputError
from kiln.optimizer.serve.job_requests import Roots
from kiln.optimizer.serve.protocol import EXTENSIONS, HEADER_LENGTH, ProtocolError, check_outputs, encode_infer, error_body, model_metadata, parse_infer
from kiln.optimizer.serve.worker import EngineWorker

APP = "kiln"
RETRY_AFTER_S = 1  # what a refused client is told to wait


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing: float = 2.0  # per replica, for the autoscaler
    max_ongoing: int = 8  # per replica; batching needs a few in hand
    max_queued: int = 16  # at the gateway, per engine, past what the replicas hold
    max_body: int = 64 << 20
    batch_wait_s: float = 0.002  # 0: no batching
    replica_cpus: float = 1.0  # a CPU engine's replica; a GPU engine's takes one GPU
    roots: Roots | None = None


class Model:
    """An engine's replica: EngineWorker on one thread, its tensor requests batched by Ray Serve."""

    def __init__(self, engine_dir: str, roots: Roots | None, batch_wait_s: float):
        self.worker = EngineWorker(Path(engine_dir), roots)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.infer_batched.set_max_batch_size(self.worker.batch_max if batch_wait_s > 0 else 1)
        self.infer_batched.set_batch_wait_timeout_s(batch_wait_s)

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def infer(self, feeds: dict) -> dict:
        """The outputs, or {"error": message} for inputs the engine cannot take."""
        try:
            self.worker.check(feeds)
        except ProtocolError as exc:
            return {"error": exc.message, "status": exc.status}
        return {"outputs": await self.infer_batched(feeds)}

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def infer_batched(self, many: list[dict]) -> list[dict]:
        return await self._on_engine(self.worker.infer, many)

    async def job(self, kind: str, spec: dict, reuse: bool) -> dict:
        try:
            return {"result": await self._on_engine(self.worker.job, kind, spec, reuse)}
        except ProtocolError as exc:
            return {"error": exc.message, "status": exc.status}

    def stats(self) -> dict:
        return {**self.worker.startup, "runs": self.worker.runs, "items": self.worker.items}


class Gateway:
    """The HTTP side: routes the protocol's paths, checks requests, calls the engines' handles."""

    def __init__(self, models: dict, metadata: dict, max_body: int):
        self.models, self.metadata, self.max_body = models, metadata, max_body
        self.draining, self.in_flight = False, 0

    def drain(self) -> None:
        self.draining = True

    def ongoing(self) -> int:
        return self.in_flight

    async def __call__(self, request: Request) -> Response:
        if self.draining and request.url.path.rstrip("/") != "/v2/health/live":  # live until it stops
            return _error("the server is shutting down; send requests to another", 503, retry=True)
        self.in_flight += 1
        try:
            return await self._route(request)
        except ProtocolError as exc:
            return _error(exc.message, exc.status, retry=exc.status == 503)
        finally:
            self.in_flight -= 1

    async def _route(self, request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        method = request.method
        if parts[:1] != ["v2"]:
            raise ProtocolError(f"no such path {request.url.path}; kiln serves the Open Inference Protocol under /v2", 404)
        rest = parts[1:]
        if method == "GET" and rest == []:
            return _json({"name": "kiln", "version": __version__, "extensions": EXTENSIONS})
        if method == "GET" and rest == ["health", "live"]:
            return _json({"live": True})
        if method == "GET" and rest == ["health", "ready"]:
            ready = all([await self._ready(name) for name in self.models])
            return _json({"ready": ready}, 200 if ready else 503)
        if len(rest) < 2 or rest[0] != "models":
            raise ProtocolError(f"no such path {request.url.path}", 404)
        name, action = rest[1], rest[2:]
        if len(action) >= 2 and action[0] == "versions":  # one version, "1", of each model
            if action[1] != "1":
                raise ProtocolError(f"model {name!r} has one version, 1, not {action[1]!r}", 404)
            action = action[2:]
        if name not in self.models:
            raise ProtocolError(f"no model {name!r}; this server has {', '.join(sorted(self.models))}", 404)
        if method == "GET" and action == []:
            return _json(self.metadata[name])
        if method == "GET" and action == ["ready"]:
            ready = await self._ready(name)
            return _json({"name": name, "ready": ready}, 200 if ready else 503)
        if method == "GET" and action == ["stats"]:
            return _json(await self._call(name, "stats"))
        if method == "POST" and action == ["infer"]:
            return await self._infer(name, request)
        if method == "POST" and len(action) == 1 and action[0] in ("interpolate", "decode"):
            spec = _json_object(await self._body(request))
            done = await self._call(name, "job", action[0], spec, retry_arg=True)
            if "error" in done:
                raise ProtocolError(done["error"], done["status"])
            return _json(done["result"])
        raise ProtocolError(f"no such path {method} {request.url.path}", 404 if method == "GET" else 405)

    async def _ready(self, name: str) -> bool:
        """A replica of the engine is running (each loaded its engine and ran it once before it counted)
        and the server is not draining. Asked of Ray Serve's controller, not the replicas, so a busy
        engine is still ready."""
        if self.draining:
            return False
        status = await asyncio.get_running_loop().run_in_executor(None, serve.status)
        deployment = status.applications[APP].deployments.get(f"model-{name}")
        return deployment is not None and deployment.replica_states.get("RUNNING", 0) > 0

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise ProtocolError(f"the body is {int(declared)} bytes, over --max-body {self.max_body}")
        if request.headers.get("content-encoding", "identity") != "identity":
            raise ProtocolError(f"Content-Encoding {request.headers['content-encoding']} is not supported; send the body uncompressed")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ProtocolError(f"the body is over --max-body {self.max_body} bytes")
        return bytes(body)

    async def _infer(self, name: str, request: Request) -> Response:
        body = await self._body(request)
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not header.isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a whole number, got {header!r}")
        parsed = parse_infer(body, None if header is None else int(header))
        check_outputs(parsed, [o["name"] for o in self.metadata[name]["outputs"]])
        done = await self._call(name, "infer", parsed.inputs)
        if "error" in done:
            raise ProtocolError(done["error"], done["status"])
        content, headers = encode_infer(name, parsed, done["outputs"])
        return Response(content, headers=headers)

    async def _call(self, name: str, method: str, *args, retry_arg: bool = False):
        """The engine's method through its handle. A replica that dies under the call gets it once more,
        on another replica (a job is told it is a retry: its output may exist from the first run)."""
        for attempt in range(2):
            try:
                extra = (attempt > 0,) if retry_arg else ()
                return await getattr(self.models[name], method).remote(*args, *extra)
            except BackPressureError:
                raise ProtocolError(f"model {name!r} is at capacity: its queue is full; retry after {RETRY_AFTER_S} s", 503) from None
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt:
                    raise ProtocolError(f"the replica running this request died, and so did the one it was retried on ({type(exc).__name__})", 503) from None


def _json(body, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def _error(message: str, status: int, retry: bool = False) -> Response:
    headers = {"retry-after": str(RETRY_AFTER_S)} if retry else {}
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the job's JSON does not parse: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError('a job is a JSON object with "input" and "output"')
    return value


def application(engines: dict[str, Path], configs: dict, options: ServeOptions):
    """The Ray Serve application: a Model deployment per engine (named by its model name) and the gateway."""
    models = {}
    for name, directory in engines.items():
        gpu = configs[name].device == "cuda"
        resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": options.replica_cpus}
        fixed = options.min_replicas == options.max_replicas
        scaling = {} if fixed else {"autoscaling_config": {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing, "upscale_delay_s": 3, "downscale_delay_s": 30}}  # fmt: skip
        deployment = serve.deployment(Model).options(
            name=f"model-{name}", ray_actor_options=resources, num_replicas=options.min_replicas if fixed else None,
            max_ongoing_requests=options.max_ongoing, max_queued_requests=options.max_queued,
            graceful_shutdown_timeout_s=600, health_check_period_s=2, **scaling,
        )  # fmt: skip
        models[name] = deployment.bind(str(directory), options.roots, options.batch_wait_s)
    metadata = {name: model_metadata(name, configs[name]) for name in engines}
    # The gateway only parses and forwards: many requests at once, each waiting on a replica.
    gateway = serve.deployment(Gateway).options(name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    return gateway.bind(models, metadata, options.max_body)


def init_ray(address: str | None) -> None:
    """Start Ray on this machine, or join the cluster at address. Ray's driver exits on SIGTERM; kiln
    keeps its own handlers, so a SIGTERM drains like Ctrl-C."""
    import ray

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def start(engines: dict[str, Path], configs: dict, options: ServeOptions, host: str, port: int, timeout_s: float, address: str | None):
    """Start (or join) Ray, run the application and wait until every replica is up; return the gateway's
    handle and the seconds taken."""
    import ray

    started = time.perf_counter()
    init_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    if any(configs[name].device == "cuda" for name in engines) and gpus < 1:
        ray.shutdown()
        raise InputError("the engines run on a GPU, and the Ray cluster has none" + ("" if address else " (Ray found no GPU on this machine)"),
                         hint="run kiln serve where Ray sees a GPU, or join a cluster that has one with --address")  # fmt: skip
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s}, logging_config={"log_level": "WARNING"})
    gateway = serve.run(application(engines, configs, options), name=APP, route_prefix="/")
    return gateway, time.perf_counter() - started


def stop(gateway, drain_timeout_s: float, owns_ray: bool) -> int:
    """Refuse new requests, let the ones in flight finish (at most drain_timeout_s), then take the
    application down; return how many were still in flight at the end."""
    import ray

    left = 0
    try:
        gateway.drain.remote().result()
        deadline = time.monotonic() + drain_timeout_s
        while (left := gateway.ongoing.remote().result()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        serve.delete(APP)
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
    return left


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
