"""A real Triton Inference Server (the tritonserver PyTriton's wheel ships) serving kiln engines as
Python-backend models, on the loopback address: a repository `kiln export triton` wrote, and `kiln serve
--frontend triton`. Answers are compared with `kiln run`, over HTTP and gRPC; concurrent requests are
batched by Triton's dynamic batcher (its statistics count the batches); bad requests get Triton's or
kiln's error and leave the server healthy."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from cluster_models import build, free_port, slow_model
from kiln.optimizer.cli import main

pytest.importorskip("pytriton", reason="needs kiln-ml[triton]")
http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from kiln.optimizer.errors import InputError  # noqa: E402
from kiln.optimizer.triton import server  # noqa: E402
from kiln.optimizer.triton.config import ExportOptions  # noqa: E402
from kiln.optimizer.triton.repository import export  # noqa: E402
from kiln.targets import read_manifest  # noqa: E402
from kiln.targets.align import METADATA_KEY as ALIGN_KEY  # noqa: E402

KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]
ROWS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engines")
    return build(slow_model(root / "slow.onnx"), root / "slow", "batch=1..2..8", "rows=1..4..16")


@pytest.fixture(scope="module")
def centred(tmp_path_factory) -> Path:
    """x minus its spatial mean, an engine that pads H and W to multiples of 8 as FILM's does to 64: the
    zeros it pads with move the mean, so an answer shows whether kiln's runtime ran it."""
    root = tmp_path_factory.mktemp("centred")
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[batch,3,height,width] x) => (float[batch,3,height,width] y) {
            m = ReduceMean <axes = [2, 3], keepdims = 1> (x)
            y = Sub(x, m)
        }""")
    onnx.helper.set_model_props(model, {ALIGN_KEY: json.dumps({"multiple": 8, "inputs": {"x": [2, 3]}, "outputs": {"y": [2, 3]}})})
    onnx.save(model, root / "centred.onnx")
    return build(root / "centred.onnx", root / "centred", "batch=1..1..2", "height=8..16..32", "width=8..16..32")


@pytest.fixture(scope="module")
def triton(engine, centred, tmp_path_factory):
    """tritonserver on a repository `kiln export triton --backend python` wrote; a batch waits up to 100 ms
    for more requests, so that concurrent ones are batched even on a busy machine."""
    repo = tmp_path_factory.mktemp("repo")
    for name, outdir in (("slow", engine), ("centred", centred)):
        directory = outdir / "engine"
        export([(directory, read_manifest(directory))], repo, name, 1, ExportOptions("python", batch_wait_us=100_000), force=False)
    signals_model(repo / "signals")
    ports = free_port(), free_port()
    with server.running(repo, "127.0.0.1", *ports, timeout=120):
        yield {"http": f"127.0.0.1:{ports[0]}", "grpc": f"127.0.0.1:{ports[1]}"}


def signals_model(folder: Path) -> None:
    """A Python-backend model that holds SIGINT and SIGTERM as kiln does while it loads a CUDA engine
    (kiln.optimizer.signals), and answers whether Triton's stub, not Python, had set their handlers."""
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\ninput [{ name: "x", data_type: TYPE_INT32, dims: [1] }]\n'
                                         'output [{ name: "y", data_type: TYPE_INT32, dims: [1] }]\ninstance_group [{ kind: KIND_CPU }]\n')  # fmt: skip
    (folder / "1" / "model.py").write_text("""
import os, signal, sys
import numpy as np
import triton_python_backend_utils as pb_utils
sys.path[:0] = [p for p in os.environ["KILN_SYS_PATH"].split(os.pathsep) if p]

class TritonPythonModel:
    def initialize(self, args):
        from kiln.optimizer.signals import signals_deferred
        self.embedded = signal.getsignal(signal.SIGTERM) is None  # a handler Python did not install
        with signals_deferred():
            pass

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", np.array([self.embedded], np.int32))]) for _ in requests]
""")


def kiln_run(engine: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    np.savez(tmp_path / "in.npz", x=x)
    assert main(["run", str(engine), "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"), "-q"]) == 0
    return np.load(tmp_path / "out.npz")["y"]


def http_infer(url: str, x: np.ndarray, binary: bool = True, datatype: str = "FP32", model: str = "slow") -> np.ndarray:
    client = http.InferenceServerClient(url)
    tensor = http.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return client.infer(model, [tensor]).as_numpy("y")


def grpc_infer(url: str, x: np.ndarray) -> np.ndarray:
    client = grpc.InferenceServerClient(url)
    tensor = grpc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer("slow", [tensor]).as_numpy("y")


def test_http_and_grpc_answers_are_kiln_run_s(triton, engine, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, ROWS, 512)).astype(np.float32)
    expected = kiln_run(engine, x, tmp_path)
    for y in (http_infer(triton["http"], x), http_infer(triton["http"], x, binary=False), grpc_infer(triton["grpc"], x)):
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    metadata = http.InferenceServerClient(triton["http"]).get_model_metadata("slow")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 512]}]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(triton, engine):
    client = http.InferenceServerClient(triton["http"])
    before = client.get_inference_statistics("slow")["model_stats"][0]
    xs = [np.random.default_rng(10 + i).standard_normal((1, ROWS, 512)).astype(np.float32) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ys = list(pool.map(lambda x: http_infer(triton["http"], x), xs))
    from kiln.optimizer.run import open_engine

    reference = open_engine(engine)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, reference.run({"x": x})["y"], rtol=1e-5, atol=1e-5)
    after = client.get_inference_statistics("slow")["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    batches = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 16 and batches < 16, (requests, batches)  # Triton's batcher handed kiln several at once
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1


def test_kiln_holds_signals_inside_triton_s_python_stub(triton):
    """Triton's stub sets SIGINT's and SIGTERM's handlers before Python starts, so Python cannot put them
    back; kiln left the stub a handler of None, and every CUDA engine failed to load (found on an H100)."""
    x = grpc.InferInput("x", [1], "INT32")
    x.set_data_from_numpy(np.zeros(1, np.int32))
    assert grpc.InferenceServerClient(triton["grpc"]).infer("signals", [x]).as_numpy("y").tolist() == [1]


def test_a_model_that_fails_to_load_is_named_with_its_error(tmp_path):
    """Triton prints a load error far above the end of its log; kiln's message leads with it."""
    folder = tmp_path / "repo" / "broken"
    signals_model(folder)
    (folder / "1" / "model.py").write_text("class TritonPythonModel:\n    def initialize(self, args):\n        raise ValueError('broken on purpose')\n")
    with pytest.raises(InputError) as failed, server.running(tmp_path / "repo", "127.0.0.1", free_port(), free_port(), timeout=120):
        pass
    assert failed.value.message.startswith("tritonserver exited with code 1 before it was ready:\nE")
    assert "failed to load 'broken' version 1: Internal: ValueError: broken on purpose" in failed.value.message


def test_kiln_s_alignment_padding_runs_inside_triton(triton, centred):
    """A 12x20 request is padded to 16x24 and cropped back, as `kiln run` does; the plain model's answer
    on 12x20 (what Triton's ONNX Runtime backend would give) differs."""
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 20)).astype(np.float32)
    y = http_infer(triton["http"], x, model="centred")
    from kiln.optimizer.run import open_engine

    np.testing.assert_allclose(y, open_engine(centred).run({"x": x})["y"], rtol=1e-6, atol=1e-6)
    assert np.abs(y - (x - x.mean(axis=(2, 3), keepdims=True))).max() > 1e-3
    config = http.InferenceServerClient(triton["http"]).get_model_config("centred")
    assert config["max_batch_size"] == 2 and config["input"][0]["dims"] == [3, -1, -1]


@pytest.mark.parametrize("x, datatype, message", [
    (np.zeros((1, ROWS, 500), np.float32), "FP32", "unexpected shape for input 'x' for model 'slow'. Expected [-1,-1,512], got [1,4,500]"),
    (np.zeros((1, ROWS, 512), np.float64), "FP64", "inference input 'x' data-type is 'FP64', but model 'slow' expects 'FP32'"),
    (np.zeros((1, 32, 512), np.float32), "FP32", "x axis 1 (rows) is 32, outside the profile 1..16; the engine was not verified at this shape"),
    (np.full((1, ROWS, 512), np.nan, np.float32), "FP32", "array 'x' holds 2048 NaN or infinite value(s)"),
])  # fmt: skip
def test_a_bad_request_gets_the_reason_and_the_server_stays_healthy(triton, x, datatype, message):
    with pytest.raises(InferenceServerException) as info:
        http_infer(triton["http"], x, datatype=datatype)
    assert message in info.value.message() and info.value.status() == "400", (info.value.status(), info.value.message())
    client = http.InferenceServerClient(triton["http"])
    assert client.is_server_ready() and client.is_model_ready("slow")
    assert http_infer(triton["http"], np.ones((1, ROWS, 512), np.float32)).shape == (1, ROWS, 512)


def test_kiln_serve_frontend_triton_serves_batches_and_drains(engine, tmp_path):
    port = free_port()
    process = subprocess.Popen([*KILN, "serve", f"dit={engine}", "--frontend", "triton", "--port", str(port), "--grpc-port", str(free_port()),
                                "--replicas", "2", "--batch-wait-ms", "50", "--drain-timeout", "20", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = process.stdout.readline()
        assert line, process.stderr.read()
        ready = json.loads(line)
        assert ready["frontend"] == "triton" and ready["models"] == {"dit": f"http://127.0.0.1:{port}/v2/models/dit"}
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        config = client.get_model_config("dit")
        assert config["backend"] == "python" and config["max_batch_size"] == 8 and config["instance_group"][0]["count"] == 2
        # Six requests of the engine's largest shape, each run alone (about 0.3 s on an idle 2-core CPU), on
        # two instances: some are still in flight at SIGTERM.
        xs = [np.random.default_rng(20 + i).standard_normal((8, 16, 512)).astype(np.float32) for i in range(6)]
        grpc_client = grpc.InferenceServerClient(ready["grpc"])

        def send(x):
            tensor = grpc.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return grpc_client.infer("dit", [tensor]).as_numpy("y")

        with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
            in_flight = [pool.submit(send, x) for x in xs]
            time.sleep(0.3)  # they have reached the server
            stats = client.get_inference_statistics("dit")["model_stats"][0]  # Triton's statistics extension
            client.close()  # a kept-alive HTTP connection would hold Triton's exit up to --drain-timeout
            assert not all(f.done() for f in in_flight)
            process.send_signal(signal.SIGTERM)
            ys = [f.result(timeout=120) for f in in_flight]  # the requests in flight finish
        from kiln.optimizer.run import open_engine

        reference = open_engine(engine)
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_allclose(y, reference.run({"x": x})["y"], rtol=1e-5, atol=1e-5)
        assert stats["name"] == "dit"
        assert process.wait(90) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("args, message", [
    (["--replicas", "1..2"], "--replicas 1..2: Triton runs a fixed number of instances per engine"),
    (["--address", "10.0.0.1:6379"], "--address is for the Ray front end"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
    (["--port", "0"], "port 0 is not a port to listen on"),
    (["--port", "18000", "--grpc-port", "18000"], "--grpc-port 18000 is --port too"),
])  # fmt: skip
def test_bad_triton_serve_options_exit_2_before_the_server_starts(engine, tmp_path, args, message):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fill = {"busy": busy.getsockname()[1]}
        done = subprocess.run([*KILN, "serve", str(engine), "--frontend", "triton", *(a.format(**fill) for a in args)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and message.format(**fill) in done.stderr, done.stderr
    assert "tritonserver" not in done.stderr
