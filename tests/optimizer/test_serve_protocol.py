"""The pieces of `kiln serve` below Ray: the Open Inference Protocol codec, job paths kept under their roots
and outputs staged, and a replica's batching of requests by shape (against the engine run one by one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.optimizer.serve.job_requests import confined, remove_partials, staged
from kiln.optimizer.serve.protocol import ProtocolError, encode_infer, parse_infer

sys.path.insert(0, str(Path(__file__).parent))
from cluster_models import build, slow_model  # noqa: E402


def binary_body(arrays: dict[str, np.ndarray], **header) -> tuple[bytes, int]:
    head = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": {"float32": "FP32", "int64": "INT64"}[v.dtype.name],
                                   "parameters": {"binary_data_size": v.nbytes}} for k, v in arrays.items()], **header}).encode()  # fmt: skip
    return head + b"".join(v.tobytes() for v in arrays.values()), len(head)


def test_json_and_binary_requests_parse_to_the_same_arrays():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = np.array([7], np.int64)
    parsed_json = parse_infer(json.dumps({"id": "r1", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[0, 1, 2], [3, 4, 5]]},
                                                                 {"name": "t", "shape": [1], "datatype": "INT64", "data": [7]}]}).encode(), None)  # fmt: skip
    body, length = binary_body({"x": x, "t": t})
    parsed_binary = parse_infer(body, length)
    for parsed in (parsed_json, parsed_binary):
        np.testing.assert_array_equal(parsed.inputs["x"], x)
        assert parsed.inputs["x"].dtype == np.float32 and parsed.inputs["t"].tolist() == [7]
    assert parsed_json.id == "r1" and parsed_json.outputs is None and parsed_json.binary_outputs == set()


def test_responses_in_json_and_binary():
    y = np.linspace(0, 1, 4, dtype=np.float16).reshape(2, 2)
    body, headers = encode_infer("m", parse_infer(b'{"id": 5, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None), {"y": y})
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {"model_name": "m", "model_version": "1", "id": "5",
                                "outputs": [{"name": "y", "datatype": "FP16", "shape": [2, 2], "data": [0.0, 0.333251953125, 0.66650390625, 1.0]}]}  # fmt: skip
    request = parse_infer(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"name": "y", "parameters": {"binary_data": true}}]}', None)
    body, headers = encode_infer("m", request, {"y": y, "unasked": y})
    length = int(headers["inference-header-content-length"])
    header = json.loads(body[:length])
    assert header["outputs"] == [{"name": "y", "datatype": "FP16", "shape": [2, 2], "parameters": {"binary_data_size": 8}}]
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float16).reshape(2, 2), y)


@pytest.mark.parametrize("body, length, message", [
    (b"{oops", None, "the request's JSON does not parse"),
    (b'{"inputs": []}', None, 'a non-empty "inputs" list'),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}', None, "shape [2] holds 2 value(s), its data has 1"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', None, "shape must be a list of non-negative whole numbers"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', None, "datatype 'BYTES' is not one kiln engines take"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["a"]}]}', None, "its data is not INT32 values"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, 'has no "data" and no binary_data_size'),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}....', "header", "the body ends 4 byte(s) short"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}....', "header", "binary_data_size is 4; shape [2] of FP32 is 8 bytes"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}........', "header", "4 byte(s) after the tensors"),
    (b"{}", 99, "Inference-Header-Content-Length is 99, and the body is 2 bytes"),
])  # fmt: skip
def test_bad_requests_say_what_is_wrong(body, length, message):
    if length == "header":  # the JSON header, then binary bytes
        length = body.rindex(b"}") + 1
    with pytest.raises(ProtocolError) as error:
        parse_infer(body, length)
    assert message in error.value.message and error.value.status == 400


def test_job_paths_stay_under_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "out-link").symlink_to(tmp_path)
    assert confined(root, "sub/a.mp4", "input") == root / "sub" / "a.mp4"
    for text, message in (("../x", "leaves the input root"), ("sub/../../x", "leaves the input root"), ("out-link/x", "leaves the input root"),
                          ("/etc/passwd", "is absolute"), ("", "must be a path"), (3, "must be a path"), ("sub/.a.kiln-partial-1", "names a temporary")):  # fmt: skip
        with pytest.raises(ProtocolError, match=message):
            confined(root, text, "input")


def test_a_staged_output_appears_whole_or_not_at_all(tmp_path):
    with staged(tmp_path / "clip.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.name.startswith(".clip.kiln-partial-")
        tmp.write_bytes(b"video")
    assert os.listdir(tmp_path) == ["clip.mp4"]
    with pytest.raises(RuntimeError), staged(tmp_path / "frames") as tmp:
        tmp.mkdir()
        (tmp / "frame_000000.png").write_bytes(b"png")
        raise RuntimeError("the encoder failed")
    assert os.listdir(tmp_path) == ["clip.mp4"]
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / ".x.kiln-partial-0").mkdir()
    (tmp_path / ".y.kiln-partial-1.mp4").write_bytes(b"")
    assert remove_partials(tmp_path) == 2 and sorted(os.listdir(tmp_path)) == ["clip.mp4", "deep"]


def test_requests_of_one_shape_are_batched_up_to_the_batch_max(tmp_path):
    from kiln.optimizer.run import open_engine
    from kiln.optimizer.serve.worker import EngineWorker

    engine_dir = build(slow_model(tmp_path / "slow.onnx"), tmp_path / "slow", "batch=1..2..4", "rows=1..4..8")
    worker = EngineWorker(engine_dir)
    assert (worker.batch_dim, worker.batch_max, worker.runs) == ("batch", 4, 0)
    shapes = [(1, 4), (2, 4), (1, 8), (1, 4), (2, 4), (1, 8)]
    requests = [{"x": np.random.default_rng(i).standard_normal((*s, 512)).astype(np.float32)} for i, s in enumerate(shapes)]
    results = worker.infer(requests)
    # rows 4: batches 1 + 2 + 1 fill one run of 4, then 2 more; rows 8: 1 + 1 in one run.
    assert (worker.runs, worker.items) == (3, 6)
    engine = open_engine(engine_dir)
    for feeds, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result["y"], engine.run(feeds)["y"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ProtocolError, match="outside the profile 1..4; the engine was not verified at this shape"):
        worker.check({"x": np.zeros((5, 4, 512), np.float32)})
