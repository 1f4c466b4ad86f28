"""The profile lint: each finding, with the dim it names and what it says to do, and the exit it gives."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kiln import targets
from kiln.optimizer.errors import InputError
from kiln.optimizer.profile_lint import Finding, check, lint_memory, lint_profiles
from kiln.optimizer.shapes import DIM_RULES_METADATA_KEY, input_specs
from kiln.targets import DimRange, Profile
from kiln.targets.work import peak_activation_bytes


def relu_model(metadata: dict[str, str] | None = None) -> ir.Model:
    """img [batch, 4, h, w] -> Relu -> Relu."""
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 4, "h", "w"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, "h", "w"])
    nodes = [helper.make_node("Relu", ["img"], ["mid"]), helper.make_node("Relu", ["mid"], ["out"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [img], [out]), opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    helper.set_model_props(proto, metadata or {})
    return ir.serde.deserialize_model(proto)


def profile(model: ir.Model, **dims: tuple[int, int, int]) -> Profile:
    ranges = {"batch": (1, 1, 1), "h": (64, 64, 64), "w": (64, 64, 64)} | dims
    return Profile(input_specs(model), {d: DimRange(*r) for d, r in ranges.items()})


def test_a_range_off_the_alignment_the_engine_pads_to():
    model = relu_model()
    [finding] = lint_profiles(model, (profile(model, w=(48, 64, 100)),), {"h": 64, "w": 64})
    assert finding == Finding("error", "alignment", "w", "the profile: w 48..64..100 holds 48, not a multiple of 64, which the engine pads it to",
                              "give multiples of 64, e.g. --shapes w=64..128")  # fmt: skip


def test_a_diffusers_model_s_patch_size_and_positional_table():
    rules = {"h": {"multiple": 2, "min": None, "max": 96, "why": "its patch_size is 2, and its positional table covers 48 patches a side"},
             "w": {"multiple": 2, "min": 8, "max": None, "why": "its patch_size is 2"}}  # fmt: skip
    model = relu_model({DIM_RULES_METADATA_KEY: json.dumps(rules)})
    findings = lint_profiles(model, (profile(model, h=(33, 64, 128), w=(4, 8, 16)),), {})
    why = "(its patch_size is 2, and its positional table covers 48 patches a side)"
    assert [(f.level, f.check, f.dim, f.message, f.hint) for f in findings] == [
        ("error", "alignment", "h", f"the profile: h 33..64..128 holds 33, not a multiple of 2, which the model takes {why}", "give multiples of 2, e.g. --shapes h=34..128"),
        ("error", "reach", "h", f"the profile: h reaches 128, past the 96 the model takes {why}", "keep h at most 96 (--shapes h=33..96)"),
        ("error", "reach", "w", "the profile: w starts at 4, below the 8 the model takes (its patch_size is 2)", "keep w at least 8"),
    ]  # fmt: skip
    with pytest.raises(InputError) as info:
        check(findings)
    assert info.value.message == f"the profile: h 33..64..128 holds 33, not a multiple of 2, which the model takes {why} (and 2 more findings of the profile lint)"
    assert info.value.hint == "give multiples of 2, e.g. --shapes h=34..128"


def test_overlapping_profiles_and_sizes_between_them_are_warnings():
    model = relu_model()
    small, large = profile(model, h=(64, 64, 256)), profile(model, h=(128, 192, 320), w=(64, 64, 128))
    far = profile(model, h=(640, 640, 640))
    findings = lint_profiles(model, (small, large, far), {})
    assert [(f.level, f.check, f.dim, f.message) for f in findings] == [
        ("warning", "overlap", None, "profiles 1 and 2 overlap at batch 1, h 128..256, w 64: a request there runs on profile 1"),
        ("warning", "gap", "h", "h 321..639 is in no profile: a request there runs unverified on the largest dynamic profile"),
    ]  # fmt: skip
    assert check(findings) == [
        "profile lint: profiles 1 and 2 overlap at batch 1, h 128..256, w 64: a request there runs on profile 1; "
        "nothing to do if that is meant; else give fewer profiles (--profiles)",
        "profile lint: h 321..639 is in no profile: a request there runs unverified on the largest dynamic profile; add those sizes to the requests if they come",
    ]  # fmt: skip


def test_sizes_between_profiles_that_pad_into_one_are_no_gap():
    model = relu_model()
    near, far = profile(model, h=(64, 64, 768)), profile(model, h=(832, 832, 832))
    assert lint_profiles(model, (near, far), {"h": 64, "w": 64}) == []  # 769..831 pad to 832
    further = profile(model, h=(1024, 1024, 1024))
    [gap] = lint_profiles(model, (near, further), {"h": 64, "w": 64})
    assert gap.message == "h 832..960 is in no profile: a request there runs unverified on the largest dynamic profile"


def test_a_request_no_profile_holds_is_an_error():
    model = relu_model()
    narrowed = profile(model, h=(64, 64, 128))  # --shapes h=64..128 over requests that reach 192
    findings = lint_profiles(model, (narrowed,), {}, [{"h": 64, "w": 64}, {"h": 192, "w": 64}])
    assert findings == [Finding("error", "gap", "h", "the request h 192, w 64 is in no profile",
                                "widen h with --shapes, or leave --shapes out so that the requests make the profiles")]  # fmt: skip


def test_memory_at_the_profile_s_max_against_the_target_s():
    model = relu_model()
    # img (the caller's, held throughout), then mid, then out: three tensors of 4 * h * w floats per batch item.
    assert peak_activation_bytes(model, {"img": (2, 4, 64, 64)}) == 3 * 2 * 4 * 64 * 64 * 4
    t4 = targets.get_target("t4")  # 16 GB
    memory = int(t4.gpu.memory_gb * 1e9)
    per_item = 3 * 4 * 4096 * 4096 * 4  # 768 MiB at 4096x4096
    fits, near, over = (memory * 0.5 // per_item, memory * 0.9 // per_item, memory * 1.2 // per_item)
    assert lint_memory(model, (profile(model, batch=(1, 1, int(fits)), h=(4096,) * 3, w=(4096,) * 3),), t4) == []
    [warning] = lint_memory(model, (profile(model, batch=(1, 1, int(near)), h=(4096,) * 3, w=(4096,) * 3),), t4)
    need = int(near) * per_item
    assert (warning.level, warning.check, warning.dim) == ("warning", "memory", "h")
    assert warning.message == (f"the profile at its max needs about {need / 1e9:.1f} GB (0.0 GB of weights, {need / 1e9:.1f} GB of activations), "
                               f"{need / memory:.0%} of the NVIDIA T4's 16 GB")  # fmt: skip
    [error] = lint_memory(model, (profile(model, batch=(1, 1, int(over)), h=(4096,) * 3, w=(4096,) * 3),), t4)
    assert error.level == "error" and error.hint == "lower the max of h with --shapes, or build for a target with more memory"
    assert lint_memory(model, (profile(model),), targets.get_target("cuda")) == []  # whatever GPU it lands on: no figure


def test_kiln_optimize_stops_on_a_lint_error_with_exit_2_and_writes_nothing(tmp_path, capsys):
    from kiln.optimizer.cli import main

    assert main(["example", "block", str(tmp_path / "block"), "-q"]) == 0
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"batch": 1, "seq": 16}, {"batch": 2, "seq": 64}]))
    model = str(tmp_path / "block" / "model.onnx")
    assert main(["optimize", model, "-o", str(tmp_path / "o"), "--profile-from", str(requests), "--shapes", "seq=8..32", "-q"]) == 2
    err = capsys.readouterr().err
    assert "error: the request batch 2, seq 64 is in no profile" in err
    assert "hint: widen seq with --shapes, or leave --shapes out so that the requests make the profiles" in err
    assert not (tmp_path / "o").exists()
    # min <= opt <= max is checked where the range is read, with the same exit.
    assert main(["optimize", model, "-o", str(tmp_path / "o"), "--shapes", "seq=64..8", "-q"]) == 2
    assert "error: --shapes 'seq=64..8': min 64 is greater than max 8" in capsys.readouterr().err
    assert main(["optimize", model, "-o", str(tmp_path / "o"), "--shapes", "seq=8..99..64", "-q"]) == 2
    assert "error: --shapes 'seq=8..99..64': opt 99 is outside 8..64" in capsys.readouterr().err
    # A warning goes into the report.
    requests.write_text(json.dumps([{"batch": 1, "seq": 16}, {"batch": 1, "seq": 64}]))
    assert main(["optimize", model, "-o", str(tmp_path / "o"), "--profile-from", str(requests), "--bench-runs", "0", "-q"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [(f["check"], f["dim"]) for f in report["lint"]] == [("gap", "seq")]
    assert "profile lint: seq 17..63 is in no profile: a request there is refused (every profile is static)" in report["notes"][-1]
