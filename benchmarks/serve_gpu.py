"""`kiln serve` on one GPU against the engine run directly: issue 19's table.

    python benchmarks/serve_gpu.py dit WORK [--requests 400] [--clients 4]
    python benchmarks/serve_gpu.py triton WORK [--requests 400] [--clients 16]
    python benchmarks/serve_gpu.py film WORK FILM_ONNX [--frames 32]
    python benchmarks/serve_gpu.py batching WORK [--requests 400] [--clients 8]
    python benchmarks/serve_gpu.py ongoing WORK [--requests 480]

dit: DiT-XL/2 (random weights at real size) as a fp16 engine for this GPU (--target auto) at 256² batch 8,
static (a CUDA graph). The engine runs in a loop, host arrays in and out (what a server must do too),
then through `kiln serve` (one replica on the GPU) with C clients sending the same inputs in the binary
tensor extension on kept-alive connections. Overhead = 1 - served throughput / loop throughput.

triton: the same engine and loop, against `kiln serve --frontend triton` (a real tritonserver running it
as a Python-backend model) with 1 and 2 instances on the GPU, C clients over HTTP and over gRPC.
Needs nvidia-pytriton (its manylinux_2_35 wheel unpacked where kiln imports it), tritonclient[grpc],
and numpy<2 in the site-packages of the Python on PATH: Triton's Python stub reads that one, not PYTHONPATH.
Build the DiT engine before numpy 1 goes in, or with a sitecustomize.py that sets numpy.long, numpy.ulong
and numpy.bool (recent transformers, which diffusers imports, uses those numpy 2 names).

film: FILM (kiln's stripped graph from `benchmarks/film_gpu.py prepare`, weights refilled) as a fp16
engine frozen to 1080p; `kiln interpolate` of F 1080p frames x2 to PNG, against the same job sent to
`kiln serve` (POST /v2/models/film/interpolate): the job's own fps and the client's (frames over the
request's time, its warm-up included).

batching: the example transformer block (a cpu engine, batch 1..4) served with batching on and off:
batch-1 requests from C clients, throughput and p50/p99 latency. Runs anywhere.

ongoing: a model of DiT-XL/2's input and output sizes that computes almost nothing (tanh, [8, 4, 32, 32]
in, [8, 8, 32, 32] out; a cpu engine), served with --max-ongoing 8 and 32 to 8 and 16 clients: the cost
of requests waiting in Ray's router rather than in the replica. Runs anywhere.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]


def kiln(*args) -> dict:
    done = subprocess.run([*KILN, *map(str, args), "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kiln {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`kiln serve` in a subprocess, up once it prints its ready line."""

    def __init__(self, *args):
        self.port = free_port()
        self.process = subprocess.Popen([*KILN, "serve", *map(str, args), "--port", str(self.port), "--json"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        line = self.process.stdout.readline()
        if not line.startswith('{"status": "ready"'):
            self.process.wait(60)
            raise SystemExit(f"kiln serve did not start:\n{line}{self.process.stdout.read()}\n{self.process.stderr.read()[-3000:]}")
        self.ready = json.loads(line)
        self.url = self.ready["url"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def binary_request(feeds: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    from kiln.optimizer.serve.protocol import datatype_of

    inputs = [{"name": k, "shape": list(v.shape), "datatype": datatype_of(v.dtype), "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    # identity: requests asks for gzip by default, and Triton then compresses every output (48 ms of DiT's 256 KB on an H100)
    return header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values()), {"Inference-Header-Content-Length": str(len(header)),
                                                                                           "Accept-Encoding": "identity"}  # fmt: skip


def timed_clients(client, clients: int) -> dict:
    """Throughput and p50/p99 latency of client(i) for i < clients run at once, each returning its
    requests' seconds."""
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        times = [t for ts in pool.map(client, range(clients)) for t in ts]
    wall = time.perf_counter() - started
    ms = np.array(times) * 1e3
    return {"requests": len(times), "per_s": len(times) / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def load(url: str, model: str, feeds: dict[str, np.ndarray], requests_total: int, clients: int) -> dict:
    """requests_total requests from clients threads, each on its own kept-alive connection."""
    import requests

    body, headers = binary_request(feeds)
    per_client = requests_total // clients

    def client(_):
        session, times = requests.Session(), []
        for _ in range(per_client):
            start = time.perf_counter()
            response = session.post(f"{url}/v2/models/{model}/infer", data=body, headers=headers, timeout=120)
            if response.status_code != 200:
                raise SystemExit(f"request failed: {response.status_code} {response.text[:500]}")
            times.append(time.perf_counter() - start)
        return times

    for _ in range(4):  # warm-up: the replica's first requests
        requests.post(f"{url}/v2/models/{model}/infer", data=body, headers=headers, timeout=120)
    return timed_clients(client, clients)


def engine_feeds(engine_dir: Path) -> dict[str, np.ndarray]:
    from kiln.targets import read_manifest

    config = read_manifest(engine_dir / "engine")
    sizes = config.profile.sizes("opt")
    rng = np.random.default_rng(0)
    return {s.name: (rng.standard_normal(s.concrete(sizes)) if np.dtype(s.dtype).kind == "f" else np.zeros(s.concrete(sizes))).astype(s.dtype)
            for s in config.inputs}  # fmt: skip


def dit_engine(work: Path) -> Path:
    engine_dir = work / "dit-engine"
    if not (engine_dir / "engine").is_dir():
        from dit_gpu import dit_xl_2

        dit_xl_2().save_pretrained(work / "dit-xl-2", safe_serialization=True)
        kiln("optimize", work / "dit-xl-2", "-o", engine_dir, "--target", "auto", "--precision", "fp16",
             "--shapes", "batch=8", "--shapes", "height=32", "--bench-runs", "0")  # fmt: skip
    return engine_dir


def loop_per_s(engine_dir: Path, feeds: dict[str, np.ndarray], runs: int) -> float:
    """The engine's runs per second in a loop, host arrays in and out; its GPU memory is freed after."""
    from kiln.optimizer.run import open_engine

    engine = open_engine(engine_dir)
    for _ in range(5):
        engine.run(feeds)
    started = time.perf_counter()
    for _ in range(runs):
        engine.run(feeds)
    return runs / (time.perf_counter() - started)


def print_table(title: str, rows: list[tuple[str, dict]], loop: float) -> None:
    print(f"\n{title}\n")
    print("| runner | runs/s | images/s | p50 ms | p99 ms | overhead |\n|---|---|---|---|---|---|")
    for name, r in rows:
        p = f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f}" if "p50_ms" in r else "| - | -"
        print(f"| {name} | {r['per_s']:.1f} | {8 * r['per_s']:.1f} {p} | {1 - r['per_s'] / loop:+.1%} |")


def dit(work: Path, requests_total: int, clients: int) -> None:
    engine_dir = dit_engine(work)
    feeds = engine_feeds(engine_dir)
    loop = loop_per_s(engine_dir, feeds, requests_total)
    rows = [("engine in a loop (host in and out)", {"per_s": loop})]
    server = Server(engine_dir, "--max-queued", "64")
    try:
        for c in sorted({1, clients}):
            rows.append((f"kiln serve, {c} client(s)", load(server.url, engine_dir.name, feeds, requests_total, c)))
    finally:
        server.stop()
    print_table(f"DiT-XL/2 256² b8 fp16, {requests_total} runs; ready in {server.ready['startup_s']:.1f} s", rows, loop)


def load_grpc(address: str, model: str, feeds: dict[str, np.ndarray], requests_total: int, clients: int) -> dict:
    """As load, over Triton's gRPC endpoint: a tritonclient per client thread."""
    import tritonclient.grpc as grpc
    from kiln.optimizer.serve.protocol import datatype_of

    def client(_):
        connection, times = grpc.InferenceServerClient(address), []
        inputs = []
        for name, value in feeds.items():
            inputs.append(grpc.InferInput(name, list(value.shape), datatype_of(value.dtype)))
            inputs[-1].set_data_from_numpy(value)
        for _ in range(requests_total // clients):
            start = time.perf_counter()
            connection.infer(model, inputs)
            times.append(time.perf_counter() - start)
        return times

    client(None)  # warm-up: the instances' first requests
    return timed_clients(client, clients)


def triton(work: Path, requests_total: int, clients: int) -> None:
    """The DiT engine behind a real Triton server (kiln serve --frontend triton, a Python-backend model
    running kiln's runtime) with C clients over HTTP (binary tensors) and gRPC, against the loop."""
    engine_dir = dit_engine(work)
    feeds = engine_feeds(engine_dir)
    loop = loop_per_s(engine_dir, feeds, requests_total)
    rows = [("engine in a loop (host in and out)", {"per_s": loop})]
    for instances in (1, 2):
        server = Server(engine_dir, "--frontend", "triton", "--replicas", instances)
        try:
            rows.append((f"Triton HTTP, {instances} instance(s), {clients} clients", load(server.url, engine_dir.name, feeds, requests_total, clients)))
            rows.append((f"Triton gRPC, {instances} instance(s), {clients} clients", load_grpc(server.ready["grpc"], engine_dir.name, feeds, requests_total, clients)))
        finally:
            server.stop()
    print_table(f"DiT-XL/2 256² b8 fp16 behind Triton, {requests_total} runs a row; ready in {server.ready['startup_s']:.1f} s", rows, loop)


def film(work: Path, film_onnx: Path, frames: int) -> None:
    from serve_pipeline import film_frames

    jobs(film_engine(work, film_onnx), film_frames(work / "in" / "clip", frames), work)


def film_engine(work: Path, film_onnx: Path) -> Path:
    engine_dir = work / "film-engine"
    if not (engine_dir / "engine").is_dir():
        import onnx

        from weights import refill

        onnx.save(refill(film_onnx), work / "film.onnx")
        kiln("optimize", work / "film.onnx", "-o", engine_dir, "--target", "auto", "--precision", "fp16", "--no-verify", "--bench-runs", "0",
             "--shapes", "batch=1", "--shapes", "height=1088", "--shapes", "width=1920")  # fmt: skip
    return engine_dir


def jobs(engine_dir: Path, source: Path, work: Path) -> None:
    """kiln interpolate of source (a folder of frames under work/in) against the same job through kiln serve."""
    direct = kiln("interpolate", engine_dir, source, "-o", work / "direct", "--force")
    (work / "out").mkdir(exist_ok=True)
    server = Server(f"film={engine_dir}", "--input-root", work / "in", "--output-root", work / "out")
    try:
        import requests

        results = []
        for k in range(2):  # the first job also pays the replica's first frames at this size
            started = time.perf_counter()
            response = requests.post(f"{server.url}/v2/models/film/interpolate", json={"input": source.name, "output": f"job-{k}"}, timeout=600)
            results.append((response.json(), time.perf_counter() - started))
            if response.status_code != 200:
                raise SystemExit(f"the job failed: {response.text[:1000]}")
    finally:
        server.stop()
    job, seconds = results[-1]
    print(f"\nFILM x2 of {source}, {direct['frames']} frames out, PNG\n")
    print("| runner | frames | fps | vs kiln interpolate |\n|---|---|---|---|")
    print(f"| kiln interpolate (its pipeline) | {direct['frames']} | {direct['fps']:.2f} | - |")
    print(f"| kiln serve job (its pipeline) | {job['frames']} | {job['fps']:.2f} | {job['fps'] / direct['fps'] - 1:+.1%} |")
    client = job["frames"] / seconds
    print(f"| kiln serve job (client: request to response) | {job['frames']} | {client:.2f} | {client / direct['fps'] - 1:+.1%} |")


def batching(work: Path, requests_total: int, clients: int) -> None:
    engine_dir = work / "block"
    if not (engine_dir / "engine").is_dir():
        kiln("example", "block", work / "ex")
        kiln("optimize", work / "ex" / "model.onnx", "-o", engine_dir, "--bench-runs", "0")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)}
    print(f"\nbatch-1 requests of the example block (cpu engine, batch 1..4), {clients} clients\n")
    print("| batching | requests/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for wait in ("0", "2"):
        server = Server(engine_dir, "--batch-wait-ms", wait, "--max-queued", "64")
        try:
            r = load(server.url, "block", feeds, requests_total, clients)
        finally:
            server.stop()
        print(f"| {'off' if wait == '0' else f'on, {wait} ms wait'} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")


def ongoing(work: Path, requests_total: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    engine_dir = work / "io"
    if not (engine_dir / "engine").is_dir():
        nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Concat", ["t", "t"], ["y"], axis=1)]
        graph = helper.make_graph(nodes, "io", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 32, 32])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 32, 32])])  # fmt: skip
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), work / "io.onnx")
        kiln("optimize", work / "io.onnx", "-o", engine_dir, "--shapes", "batch=8", "--bench-runs", "0")
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 4, 32, 32)).astype(np.float32)}
    print("\nDiT-sized requests to a cpu engine that computes almost nothing\n")
    print("| --max-ongoing | clients | requests/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for held in ("8", "32"):
        server = Server(engine_dir, "--max-ongoing", held, "--max-queued", "64")
        try:
            for clients in (8, 16):
                r = load(server.url, "io", feeds, requests_total, clients)
                print(f"| {held} | {clients} | {r['per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["dit", "triton", "film", "batching", "ongoing"])
    parser.add_argument("work", type=Path)
    parser.add_argument("film_onnx", type=Path, nargs="?")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--frames", type=int, default=32)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one machine, loopback only
    if args.case == "dit":
        dit(args.work, args.requests, args.clients)
    elif args.case == "triton":
        triton(args.work, args.requests, args.clients)
    elif args.case == "film":
        film(args.work, args.film_onnx, args.frames)
    elif args.case == "batching":
        batching(args.work, args.requests, args.clients)
    else:
        ongoing(args.work, args.requests)


if __name__ == "__main__":
    main()
