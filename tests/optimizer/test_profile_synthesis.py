"""Profiles from request shapes: presets and request files read, shapes grouped into K buckets by the
least padded work, the waste of each bucket, and the refusals naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln import targets
from kiln.optimizer.errors import InputError
from kiln.optimizer.profile_synthesis import (
    AUTO_RULE, AUTO_WASTE, Bucket, bucket_requests, buckets_json, choose_count, read_requests, shape_counts, waste_of,
)  # fmt: skip

HW = ["height", "width"]


def test_a_bucket_s_range_opt_and_waste_by_hand():
    bucket = Bucket((((64, 64), 3), ((128, 64), 1)))
    assert (bucket.low(), bucket.opt(), bucket.high(), bucket.count) == ((64, 64), (64, 64), (128, 64), 4)
    # Padded to 128x64: three requests of 64x64 waste 4096 each, of 3 * 8192 + 8192 computed.
    assert bucket.padded_work() == 3 * 4096 and bucket.waste() == pytest.approx(3 * 4096 / (4 * 8192))


def test_requests_are_grouped_so_that_the_least_work_goes_to_padding():
    requests = [{"height": 64, "width": 64, "count": 10}, {"height": 64, "width": 128, "count": 10},
                {"height": 512, "width": 512, "count": 1}, {"height": 512, "width": 448, "count": 1}]  # fmt: skip
    two = bucket_requests(requests, HW, 2)
    # The small ones together, the large ones together: merging 64x64 into 512x512 would pad far more.
    assert [(b.low(), b.high()) for b in two] == [((64, 64), (64, 128)), ((512, 448), (512, 512))]
    assert [b.opt() for b in two] == [(64, 128), (512, 512)]  # the most frequent; the larger of a tie
    assert waste_of(two) == pytest.approx((10 * 4096 + 1 * 512 * 64) / (20 * 8192 + 2 * 512 * 512))
    one = bucket_requests(requests, HW, 1)
    assert len(one) == 1 and one[0].high() == (512, 512) and waste_of(one) > waste_of(two)
    assert waste_of(bucket_requests(requests, HW, 4)) == 0.0  # a bucket per shape
    assert buckets_json(two, HW)[0] == {"dims": {"height": {"min": 64, "opt": 64, "max": 64}, "width": {"min": 64, "opt": 128, "max": 128}},
                                        "requests": 20, "shapes": 2, "waste": 0.25}  # fmt: skip


def test_sizes_are_rounded_up_to_the_alignment_before_bucketing():
    _, phone = read_requests("phone")
    buckets = bucket_requests(phone, HW, 8, {"height": 64, "width": 64})
    assert len(buckets) == 8 and waste_of(buckets) == 0.0
    assert {b.high() for b in buckets} >= {(1088, 1920), (1920, 1088), (768, 768)}  # 1080 -> 1088, 720 -> 768
    two = bucket_requests(phone, HW, 2, {"height": 64, "width": 64})
    assert [b.high() for b in two] == [(1088, 1920), (1920, 1088)] and waste_of(two) == pytest.approx(0.386, abs=1e-3)


def test_a_request_file_is_read_and_bad_ones_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"requests": [{"height": 720, "width": 1280, "count": 7}, {"height": 1080, "width": 1920}]}))
    assert read_requests(str(path)) == (str(path), [{"height": 720, "width": 1280, "count": 7}, {"height": 1080, "width": 1920, "count": 1}])
    assert read_requests("video-720p") == ("preset video-720p", [{"height": 720, "width": 1280, "count": 1}])
    for text, message in (("[]", "expected a non-empty list of request shapes"), ("{", "is not valid JSON"),
                          ('[{"height": 0, "width": 4}]', "request 0: height is 0, not a whole number of 1 or more"),
                          ('[{"height": 4.5, "width": 4}]', "request 0: height is 4.5"), ('[3]', "request 0 is not an object")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(InputError, match=message):
            read_requests(str(path))
    with pytest.raises(InputError, match="--profile-from tablet: no such file, and no preset of that name") as info:
        read_requests("tablet")
    assert info.value.hint == "give a JSON file of request shapes, or a preset: phone, video-720p, video-1080p"
    with pytest.raises(InputError, match="request 0 gives frames, height, width, and the profile is over height, width"):
        bucket_requests([{"height": 4, "width": 4, "frames": 2, "count": 1}], HW, 2)
    with pytest.raises(InputError, match="--profiles 0: at least 1"):
        bucket_requests([{"height": 4, "width": 4, "count": 1}], HW, 0)


def test_auto_takes_the_fewest_profiles_whose_waste_is_at_most_a_tenth():
    small_and_large = [{"height": 64, "width": 64, "count": 10}, {"height": 64, "width": 128, "count": 10},
                       {"height": 512, "width": 512, "count": 1}, {"height": 512, "width": 448, "count": 1}]  # fmt: skip
    shapes = shape_counts(small_and_large, HW)
    count, splits = choose_count(shapes, "auto")
    # One profile (512x512 for all 22) pads most of the work. Two: the small ones at 64x128 pad 10 * 4096,
    # the large ones at 512x512 pad 512 * 64: 10.7%. Three: the large ones apart: 5.1%, the fewest at 10% or less.
    computed_one = 22 * 512 * 512
    assert waste_of(splits[1]) == pytest.approx(1 - (10 * 4096 + 10 * 8192 + 512 * 512 + 512 * 448) / computed_one)
    assert waste_of(splits[2]) == pytest.approx((10 * 4096 + 512 * 64) / (20 * 8192 + 2 * 512 * 512))
    assert waste_of(splits[3]) == pytest.approx(512 * 64 / (10 * 4096 + 10 * 8192 + 2 * 512 * 512))
    assert count == 3 and AUTO_RULE == "the fewest profiles, up to 4, whose padding waste is at most 10%"
    assert choose_count(shapes, 2)[0] == 2 and choose_count(shapes, 8)[0] == 4  # never more than the shapes
    six = shape_counts([{"height": 64 * i, "width": 64, "count": 1} for i in range(1, 7)], HW)
    count, splits = choose_count(six, 8)
    assert count == 6 and waste_of(splits[6]) == 0.0 and sorted(splits) == [1, 2, 3, 4, 6]
    _, phone = read_requests("phone")
    phone_shapes = shape_counts(phone, HW, {"height": 64, "width": 64})
    count, splits = choose_count(phone_shapes, "auto")
    assert count == 4 and waste_of(splits[4]) > AUTO_WASTE  # none reaches 10%: the most auto takes


def test_kiln_optimize_builds_a_profile_per_bucket_and_each_request_runs_on_its_own(tmp_path, capsys):
    from kiln.optimizer.cli import main
    from kiln.targets import EngineSet, load_engine

    assert main(["example", "block", str(tmp_path / "block"), "-q"]) == 0
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"batch": 1, "seq": 16, "count": 6}, {"batch": 1, "seq": 24, "count": 2}, {"batch": 4, "seq": 64, "count": 2},
                                    {"batch": 4, "seq": 8}]))  # fmt: skip
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(out), "--profile-from", str(requests), "--profiles", "3",
                 "--bench-runs", "1", "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    # The range they span, with the most frequent request as opt; then a profile per bucket.
    assert report["profile"]["dims"] == {"batch": {"min": 1, "opt": 1, "max": 4}, "seq": {"min": 8, "opt": 16, "max": 64}}
    ranges = [{d: (r["min"], r["opt"], r["max"]) for d, r in p["dims"].items()} for p in report["profiles"]]
    assert ranges == [{"batch": (1, 1, 1), "seq": (16, 16, 24)}, {"batch": (4, 4, 4), "seq": (8, 8, 8)}, {"batch": (4, 4, 4), "seq": (64, 64, 64)}]
    section = report["profile_from"]
    assert (section["requests"], section["shapes"], section["asked"], len(section["profiles"])) == (11, 4, 3, 3)
    # Profile 1 pads 16 to 24 for 6 of its 8 requests: 6 * 8 * 64 of 8 * 24 * 64 computed.
    assert [p["waste"] for p in section["profiles"]] == [pytest.approx(6 * 8 / (8 * 24), abs=1e-4), 0.0, 0.0]
    assert [s["profiles"] for s in section["split"]] == [1, 2, 3, 4] and section["split"][-1]["waste"] == 0.0
    # Verified at the corners of each profile, on that profile's own session.
    assert [c["corner"] for c in report["verification"]["shapes"]] == ["profile 1: min", "profile 1: max", "profile 2", "profile 3"]
    assert all(c["passed"] for c in report["verification"]["shapes"])
    assert [r["corner"] for r in report["latency"]] == ["profile 1: min", "profile 1: max", "profile 2", "profile 3"]
    assert "## Profiles from requests" in (out / "report.md").read_text()
    assert "| 3 | batch 4, seq 64 | 2 | 1 | 0.0% |" in (out / "report.md").read_text()

    engine = load_engine(out / "engine")
    assert isinstance(engine, EngineSet) and len(engine.members) == 3
    assert len({id(m.session) for m in engine.members}) == 3  # two static profiles of their own, and the dynamic one
    assert [engine.member_for({"x": s}) for s in ((1, 20, 64), (4, 8, 64), (4, 64, 64), (2, 30, 64))] == [0, 1, 2, 0]
    x = np.random.default_rng(0).standard_normal((4, 64, 64)).astype(np.float32)
    binding = engine.bind(targets.HostBuffers())
    got = binding.run({"x": x})
    assert binding.profile == 2 and np.allclose(got["y"], engine.members[2].run({"x": x})["y"])
    # A static profile's session has its dims fixed: it takes its shape alone.
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        engine.members[1].session.run(None, {"x": x})
    assert engine.check_feeds({"x": x[:1, :20]}, "f") == []  # in profile 1's range
    assert engine.check_feeds({"x": x[:3]}, "f") == ["shapes x [3, 64, 64] are in none of the engine's 3 profiles; the engine was not verified at this shape"]


def test_kiln_optimize_reports_the_waste_and_lets_shapes_win(tmp_path, capsys):
    from kiln.optimizer.cli import main

    assert main(["example", "block", str(tmp_path / "block"), "-q"]) == 0
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"batch": 1, "seq": 16, "count": 6}, {"batch": 2, "seq": 64, "count": 2}, {"batch": 4, "seq": 8}]))
    out = tmp_path / "out"
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(out), "--profile-from", str(requests), "--profiles", "1",
                 "--bench-runs", "0", "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["profile"]["dims"] == {"batch": {"min": 1, "opt": 1, "max": 4}, "seq": {"min": 8, "opt": 16, "max": 64}}
    assert report["profiles"] == [] and report["profile_from"]["replaced"] == []
    # Served at 4x64: 6 * (256 - 16) + 2 * (256 - 128) + (256 - 32) padded, of 9 * 256.
    assert report["profile_from"]["waste"] == pytest.approx((6 * 240 + 2 * 128 + 224) / (9 * 256), abs=1e-4)
    # --shapes wins over the requests for the dims it names, in every profile.
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(tmp_path / "o2"), "--profile-from", str(requests),
                 "--shapes", "seq=4..128", "--bench-runs", "0", "-q"]) == 0  # fmt: skip
    replaced = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert replaced["profile"]["dims"]["seq"] == {"min": 4, "opt": 66, "max": 128} and replaced["profile_from"]["replaced"] == ["seq"]
    assert {p["dims"]["seq"]["max"] for p in replaced["profiles"]} == {128}
    requests.write_text(json.dumps([{"height": 64, "width": 64}]))
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(tmp_path / "o3"), "--profile-from", str(requests), "-q"]) == 2
    assert "'height' is not a dynamic dim of the model, whose dynamic dims are batch, seq" in capsys.readouterr().err
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(tmp_path / "o4"), "--profiles", "2", "-q"]) == 2
    assert "error: --profiles 2 needs --profile-from: the profiles are made from request shapes" in capsys.readouterr().err
    assert main(["optimize", str(tmp_path / "block" / "model.onnx"), "-o", str(tmp_path / "o4"), "--profile-from", "phone", "--profiles", "x", "-q"]) == 2
    assert "error: --profiles x: give a number of profiles from 1 to 8, or auto" in capsys.readouterr().err
