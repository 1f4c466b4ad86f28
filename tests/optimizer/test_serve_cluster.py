"""`kiln serve` on a local Ray instance with CPU replicas, end to end over HTTP on the loopback address:
the Open Inference Protocol (tritonclient.http against it), load with every answer checked, a replica
killed mid-request, a full queue, bad requests, and a graceful shutdown. Every request loop is bounded
in count and time.

One server for the module (two replicas per engine, a queue of 4), driven by this process, which also
owns the Ray instance the server joins (so it can kill a replica). The shutdown test runs last."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")
http = pytest.importorskip("tritonclient.http")

sys.path.insert(0, str(Path(__file__).parent))
from cluster_models import build, free_port, slow_model, toy_decoder  # noqa: E402

KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]
SLOW = (4, 64)  # batch and rows of a request that holds a replica for about a second
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    return {
        "slow": build(slow_model(root / "slow.onnx"), root / "slow", "batch=1..2..4", "rows=1..16..64"),
        "vae": build(toy_decoder(root / "dec.onnx"), root / "vae", "batch=1..2..4", "height=8", "width=8"),
    }


def start_server(engines: dict[str, Path], root: Path, address: str, port: int, max_ongoing: int = 2) -> tuple[subprocess.Popen, dict]:
    """kiln serve of the engines, two replicas each, a queue of 4, jobs under root/in and root/out;
    (the process, its ready line) once every replica has loaded and run its engine."""
    process = subprocess.Popen([*KILN, "serve", *engines.values(), "--port", str(port), "--replicas", "2", "--max-ongoing", str(max_ongoing),
                                "--max-queued", "4", "--max-body", str(MAX_BODY), "--input-root", root / "in",
                                "--output-root", root / "out", "--address", address, "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return process, json.loads(line)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, engines):
    root = tmp_path_factory.mktemp("serve")
    (root / "in").mkdir()
    (root / "out").mkdir()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    process, ready = start_server(engines, root, address, free_port())
    try:
        yield {"url": ready["url"], "port": int(ready["url"].rsplit(":", 1)[1]), "root": root, "engines": engines, "process": process, "address": address}
    finally:
        stop_server(process)
        ray.shutdown()


def local(engine: Path, feeds: dict) -> dict:
    from kiln.optimizer.run import open_engine

    return open_engine(engine).run(feeds)


def infer(url: str, x: np.ndarray, timeout: float = 60) -> tuple[int, np.ndarray | str, dict]:
    """x through the slow engine in the binary extension: (status, y or the error, the headers)."""
    header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    response = requests.post(f"{url}/v2/models/slow/infer", data=header + x.tobytes(), timeout=timeout,
                             headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    if not response.ok:
        return response.status_code, response.text, response.headers
    length = int(response.headers["Inference-Header-Content-Length"])
    assert json.loads(response.content[:length])["outputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    return response.status_code, np.frombuffer(response.content[length:], np.float32).reshape(x.shape), response.headers


def test_health_and_metadata(server):
    url = server["url"]
    assert requests.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    meta = requests.get(f"{url}/v2/models/slow", timeout=10).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 512]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 512]}]
    assert meta["parameters"]["kiln_dims"] == {"batch": {"min": 1, "opt": 2, "max": 4}, "rows": {"min": 1, "opt": 16, "max": 64}}
    assert requests.get(f"{url}/v2/models/slow/versions/1/ready", timeout=10).json() == {"name": "slow", "ready": True}
    assert requests.get(f"{url}/v2/models/nope", timeout=10).status_code == 404


def test_tritonclient_json_and_binary(server):
    client = http.InferenceServerClient(f"127.0.0.1:{server['port']}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("vae")
    latents = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    want = local(server["engines"]["vae"], {"latent_sample": latents})["sample"]
    for binary in (True, False):
        tensor = http.InferInput("latent_sample", list(latents.shape), "FP32")
        tensor.set_data_from_numpy(latents, binary_data=binary)
        result = client.infer("vae", [tensor], outputs=[http.InferRequestedOutput("sample", binary_data=binary)])
        np.testing.assert_array_equal(result.as_numpy("sample"), want)
        assert result.get_response()["model_name"] == "vae"


def test_load_every_request_gets_one_correct_answer(server):
    """6 clients, 16 requests each, of mixed shapes (so the replicas batch some and not others). A client
    told 503 waits Retry-After and sends it again, as the protocol asks: Ray Serve's queue bound is
    checked before a request is assigned, so a burst can be refused a little early."""
    url, engine = server["url"], server["engines"]["slow"]
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 2, 2 * (1 + i % 3), 512)).astype(np.float32) for i in range(96)]
    wants = [local(engine, {"x": x})["y"] for x in inputs]
    before = replica_stats(url)

    def client(k: int) -> list[tuple[int, float, int, np.ndarray]]:
        answers = []
        for i in range(k, len(inputs), 6):
            start, refused = time.perf_counter(), 0
            while (answer := infer(url, inputs[i]))[0] == 503 and refused < 5:
                refused += 1
                time.sleep(float(answer[2]["retry-after"]))
            answers.append((i, time.perf_counter() - start, answer[0], answer[1], refused))
        return answers

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [a for answers in pool.map(client, range(6), timeout=240) for a in answers]
    wall = time.perf_counter() - started
    assert sorted(i for i, *_ in answers) == list(range(96))  # one answer per request
    assert [code for _, _, code, _, _ in answers] == [200] * 96
    for i, _, _, y, _ in answers:
        np.testing.assert_allclose(y, wants[i], rtol=1e-5, atol=1e-5)
    latencies = np.array([a[1] for a in answers]) * 1e3
    print(f"\nload: 96 requests from 6 clients in {wall:.2f} s, {96 / wall:.1f} requests/s, p50 {np.percentile(latencies, 50):.1f} ms, "
          f"p99 {np.percentile(latencies, 99):.1f} ms, {sum(a[4] for a in answers)} refused and sent again")  # fmt: skip
    after = replica_stats(url)
    assert all(s["items"] >= s["runs"] >= 1 for s in after.values())
    assert sum(s["items"] for s in after.values()) - sum(s["items"] for s in before.values()) == 96  # each request ran once


def replica_stats(url: str) -> dict[str, dict]:
    """The slow engine's stats from each of its two replicas, asked until both have answered."""
    seen = {}
    for _ in range(100):
        stats = requests.get(f"{url}/v2/models/slow/stats", timeout=10).json()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            return seen
    raise AssertionError(f"stats came from {len(seen)} replica(s) of 2")


def test_a_full_queue_refuses_at_once_and_the_server_stays_healthy(server):
    """2 replicas x 2 ongoing + 4 queued = 8 held; 16 slow requests at once: the rest get Ray Serve's 503
    with Retry-After."""
    url = server["url"]
    x = np.zeros(SLOW + (512,), np.float32)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(infer, url, x, 120) for _ in range(16)]
        responses = [f.result(timeout=180) for f in futures]
    codes = sorted(code for code, *_ in responses)
    refused = [(error, headers) for code, error, headers in responses if code == 503]
    assert codes.count(200) >= 8 and refused and set(codes) <= {200, 503}, codes
    assert all(headers["retry-after"] == "1" and "backpressure" in error for error, headers in refused), refused[0]
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


def test_bad_requests_get_400_with_a_message(server):
    url, root = server["url"], server["root"]

    def bad(fragment: str, path: str = "slow/infer", **kwargs) -> None:
        response = requests.post(f"{url}/v2/models/{path}", timeout=30, **kwargs)
        assert response.status_code == 400 and fragment in response.json()["error"], (response.status_code, response.text)

    one = {"name": "x", "shape": [1, 4, 512], "datatype": "FP32", "data": [0.0] * 2048}
    bad("missing ['x']; unexpected ['z']", json={"inputs": [{**one, "name": "z"}]})
    bad("input 'x' has shape [1, 4, 511], the engine takes ['batch', 'rows', 512]", json={"inputs": [{**one, "shape": [1, 4, 511], "data": [0.0] * 2044}]})
    bad("input 'x' is float64, the engine takes float32", json={"inputs": [{**one, "datatype": "FP64"}]})
    bad("shape [1, 4, 512] holds 2048 value(s), its data has 3", json={"inputs": [{**one, "data": [1, 2, 3]}]})
    nan = np.zeros((1, 4, 512), np.float32)
    nan[0, 0, 0] = np.nan  # JSON has no NaN: in binary
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 4, 512], "datatype": "FP32", "parameters": {"binary_data_size": nan.nbytes}}]}).encode()
    bad("array 'x' holds 1 NaN or infinite value(s)", data=header + nan.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))})
    bad("outside the profile 1..4", json={"inputs": [{**one, "shape": [8, 4, 512], "data": [0.0] * 8 * 2048}]})
    bad(f"over --max-body {MAX_BODY}", data=b"{" + b" " * MAX_BODY + b"}")
    bad("the request's JSON does not parse", data=b"{not json")
    (root / "in" / "latents.npy").parent.mkdir(exist_ok=True)
    np.save(root / "in" / "latents.npy", np.zeros((2, 4, 8, 8), np.float32))
    bad("leaves the input root", "vae/decode", json={"input": "../serve-secrets.npy", "output": "a"})
    (root / "in" / "escape").symlink_to(root.parent)
    bad("leaves the input root", "vae/decode", json={"input": "escape/x.npy", "output": "a"})
    bad("leaves the output root", "vae/decode", json={"input": "latents.npy", "output": "../elsewhere"})
    bad('"input" \'/etc/passwd\' is absolute', "vae/decode", json={"input": "/etc/passwd", "output": "a"})
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert not any((root / "out").iterdir())  # nothing written by a refused job


def test_decode_job_writes_its_output_whole(server):
    url, root = server["url"], server["root"]
    latents = np.random.default_rng(3).standard_normal((5, 4, 8, 8)).astype(np.float32)
    np.save(root / "in" / "clip.npy", latents)
    response = requests.post(f"{url}/v2/models/vae/decode", json={"input": "clip.npy", "output": "clips/clip"}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["output"] == "clips/clip" and response.json()["frames"] == 5
    assert sorted(os.listdir(root / "out" / "clips" / "clip")) == [f"frame_{i:06d}.png" for i in range(5)]
    again = requests.post(f"{url}/v2/models/vae/decode", json={"input": "clip.npy", "output": "clips/clip"}, timeout=60)
    assert again.status_code == 409 and "exists" in again.json()["error"]


def _replicas(app: str) -> list[str]:
    """The actor names of an application's engine replicas (SERVE_REPLICA::APP#model#ID)."""
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app}#model#" in a["name"]]


def test_graceful_shutdown_finishes_in_flight_and_refuses_new(server):
    """It stops the module's server. Four slow requests hold both replicas for two runs each."""
    url, process = server["url"], server["process"]
    x = np.zeros(SLOW + (512,), np.float32)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(infer, url, x, 120) for _ in range(4)]
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 503  # draining
        assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200
        assert [f.result(timeout=120)[0] for f in in_flight] == [200] * 4
        try:
            late = infer(url, x[:1, :1], 10)[0]
        except requests.ConnectionError:
            late = "refused"
        assert late in (404, 503, "refused")
    assert process.wait(90) == 0
    assert "draining" in process.stderr.read()


def test_a_replica_killed_mid_request_fails_it_and_the_server_recovers(server, tmp_path):
    """Two slow requests, one on each replica; one replica is killed. Its request fails with Ray Serve's
    500 (the other's answer is right), the request sent again is answered right, and Ray Serve starts a
    replica in its place. On a server of its own: the test before stopped the module's."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    # Ray Serve stays up on the test's cluster, on the port it took first. One request per replica at
    # most, so that the two requests run on different replicas.
    process, ready = start_server(server["engines"], tmp_path, server["address"], server["port"], max_ongoing=1)
    try:
        killed_replica(ready["url"], server["engines"]["slow"])
    finally:
        stop_server(process)


def killed_replica(url: str, engine: Path) -> None:
    xs = [np.random.default_rng(10 + i).standard_normal(SLOW + (512,)).astype(np.float32) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(infer, url, x, 120) for x in xs]
        time.sleep(0.3)  # both are running, one on each replica (--max-ongoing 1)
        victim = _replicas("kiln-slow")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        responses = [f.result(timeout=180) for f in futures]
    assert sorted(code for code, *_ in responses) in ([200, 200], [200, 500]), [r[:2] for r in responses]
    for x, (code, y, _) in zip(xs, responses, strict=True):
        if code == 500:
            assert y == "Internal Server Error"  # all Ray Serve's proxy says
            code, y, _ = infer(url, x, 120)  # the client sends it again
        assert code == 200, y
        np.testing.assert_allclose(y, local(engine, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    deadline = time.monotonic() + 60  # Ray Serve replaces the replica
    while len(_replicas("kiln-slow")) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_replicas("kiln-slow")) == 2
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("args, message", [
    (["missing-dir"], "missing-dir: no such directory"),
    (["{slow}", "--replicas", "3..1"], "--replicas 3..1: need 1 <= MIN <= MAX"),
    (["{slow}", "--replicas", "two"], "--replicas takes N or MIN..MAX"),
    (["{slow}", "--input-root", "{root}"], "jobs need both --input-root and --output-root"),
    (["{slow}", "--input-root", "{root}/nope", "--output-root", "{root}"], "the input root {root}/nope is not a directory"),
    (["{slow}", "{slow}"], "two engines are named 'slow'"),
    (["bad name={slow}"], "model name 'bad name' is not a name a URL can carry"),
    (["{slow}", "--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
])  # fmt: skip
def test_bad_serve_options_exit_2_before_ray_starts(engines, tmp_path, args, message):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"slow": engines["slow"], "root": tmp_path, "busy": busy.getsockname()[1]}
        done = subprocess.run([*KILN, "serve", *(a.format(**fill) for a in args)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and message.format(**fill) in done.stderr, done.stderr
    assert "Ray" not in done.stderr  # refused before Ray started


def test_replicas_this_machine_cannot_place_exit_2_once_ray_has_counted(engines, tmp_path):
    """Ray started here cannot grow: two replicas of 1000 CPUs each are refused, not left pending."""
    done = subprocess.run([*KILN, "serve", engines["slow"], "--replicas", "2", "--replica-cpus", "1000", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "kiln: error: --replicas 2 of 1 engine(s) (2 replicas) need 2000 CPUs; the Ray cluster has " in done.stderr
