"""One seeded fuzz case per call, for each command: the files it reads laid out in a sandbox, and the
command line. Most inputs are bad in one way; some are good, so the paths that succeed are judged too."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import fuzz_inputs as inputs
from fuzz_harness import SIGNALS, Case

COMMANDS = ("optimize", "compare", "run", "bench", "interpolate", "decode", "example")


def _choice(rng, options):
    return options[int(rng.integers(0, len(options)))]


def _output_path(rng, sandbox: Path, name: str, kind: str) -> tuple[str, Path]:
    """Where a command writes: usually a new path, else one of the awkward places a user may give."""
    choice = int(rng.integers(0, 10))
    path = sandbox / name
    if choice <= 4:
        return "new output", path
    if choice == 5:
        path.write_text("the user's file")
        return "output is a file", path
    if choice == 6:
        path.mkdir()
        (path / "mine.txt").write_text("the user's")
        return "output is a full folder", path
    if choice == 7:
        (sandbox / "elsewhere").mkdir(exist_ok=True)
        target = sandbox / "elsewhere" / name
        if kind == "dir":
            target.mkdir()
        else:
            target.write_text("linked")
        path.symlink_to(target)
        return "output is a symlink", path
    if choice == 8:
        return "unwritable output", Path(_choice(rng, ["/proc/kiln", "/proc/kiln/x/y", "/proc/self/x", "/sys/kiln"])) / name
    return "output in a new folder", sandbox / "new" / "deeper" / name


def optimize_case(rng, sandbox: Path, engines: dict) -> Case:
    model_dir = sandbox / "model"
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    choice = int(rng.integers(0, 12))
    extra: list[str] = []
    if choice <= 4:
        kind, data = inputs.mutated_model(rng)
        path.write_bytes(data)
    elif choice == 5:
        kind = _choice(rng, ["truncated", "random bytes", "flipped bytes"])
        fn = {"truncated": inputs.truncated, "random bytes": inputs.random_bytes, "flipped bytes": inputs.flipped_bytes}[kind]
        path.write_bytes(fn(rng, inputs.model_bytes()))
    elif choice == 6:
        escape = _choice(rng, inputs.ESCAPES)
        kind = f"external data: {escape}"
        inputs.external_data_model(rng, model_dir, sandbox / "outside.bin", escape)
    elif choice == 7:
        kind = _choice(rng, ["no model in dir", "two models", "model is a dir", "missing model", "empty file"])
        if kind == "two models":
            path.write_bytes(inputs.model_bytes())
            (model_dir / "other.onnx").write_bytes(inputs.model_bytes())
            path = model_dir
        elif kind == "model is a dir":
            path.mkdir()
        elif kind == "missing model":
            path = model_dir / "missing.onnx"
        elif kind == "empty file":
            path.write_bytes(b"")
        else:
            (model_dir / "readme.txt").write_text("no model")
            path = model_dir
    elif choice in (8, 9):
        path.write_bytes(inputs.model_bytes())
        kind, extra = _bad_options(rng, sandbox)
    else:
        path.write_bytes(inputs.model_bytes())
        kind = "good model"
        extra = _choice(rng, [[], ["--precision", "fp16"], ["--shapes", "batch=2", "--shapes", "seq=8"], ["--no-verify"]])
    out_kind, out = _output_path(rng, sandbox, "out", "dir")
    if out_kind == "output is a full folder" and rng.integers(0, 2):
        shutil.copytree(engines["block"], out, dirs_exist_ok=True)  # a kiln output with the user's file in it
        out_kind = "kiln output holding the user's file"
    return Case("optimize", f"{kind}; {out_kind}", ["optimize", str(path), "-o", str(out), "--bench-runs", "0", *extra], out)


_BAD_GRIDS = [[], ["--grid", "precision="], ["--grid", "shapes=batch=1"], ["--grid", "nope=1"], ["--grid", "precision=fp9"],
              ["--grid", "quantize=int8", "--grid", "calib-samples=0"], ["--grid", "disable-pass=nope"], ["--or"], ["--grid", "=x"],
              ["--grid", "quantize=int8", "--grid", f"calib-samples={','.join(map(str, range(1, 30)))}"]]  # fmt: skip
_GOOD_GRIDS = [["--grid", "precision=fp32,fp16"], ["--grid", "quantize=none,int8", "--grid", "calib-samples=2,4"],
               ["--grid", "quantize=fp8,int8"]]  # fmt: skip


def compare_case(rng, sandbox: Path, engines: dict) -> Case:
    model_dir = sandbox / "model"
    model_dir.mkdir()
    path = model_dir / "model.onnx"
    choice = int(rng.integers(0, 8))
    grid = _GOOD_GRIDS[0]
    if choice <= 1:
        kind, data = inputs.mutated_model(rng)
        path.write_bytes(data)
    elif choice == 2:
        kind = "truncated model"
        path.write_bytes(inputs.truncated(rng, inputs.model_bytes()))
    elif choice == 3:
        kind, path = "missing model", model_dir / "missing.onnx"
    elif choice == 4:
        path.write_bytes(inputs.model_bytes())
        kind, grid = "bad grid", _choice(rng, _BAD_GRIDS)
    else:
        path.write_bytes(inputs.model_bytes())
        kind, grid = "good model", _choice(rng, _GOOD_GRIDS)
    out_kind, out = _output_path(rng, sandbox, "out", "dir")
    if out_kind == "output is a full folder" and rng.integers(0, 2):
        shutil.copytree(engines["block"], out, dirs_exist_ok=True)  # kiln optimize's output is not kiln compare's
        out_kind = "kiln optimize output"
    return Case("compare", f"{kind}; {out_kind}", ["compare", str(path), "-o", str(out), "--bench-runs", "1", *grid], out)


def _bad_options(rng, sandbox: Path) -> tuple[str, list[str]]:
    choice = int(rng.integers(0, 9))
    if choice == 0:
        spec = _choice(rng, ["batch=0..4", "batch=a", "batch=4..1", "x:9=1..2", "seq=1..99999999999", "frames=1..2", "=1..2", "batch=1..2..3..4", "x:2=1..8"])
        return "bad --shapes", ["--shapes", spec]
    if choice == 1:
        return "bad precision for the target", ["--precision", _choice(rng, ["bf16", "int8", "fp64"])]
    if choice == 2:
        return "unknown target", ["--target", _choice(rng, ["tpu", "h100", "cuda", "", "../cpu"])]
    if choice == 3:
        return "bad number", [_choice(rng, ["--bench-runs", "--seed", "--opset", "--align"]), _choice(rng, ["-1", "x", "1e9", "99999999999999999999"])]
    if choice == 4:
        recipe = sandbox / "recipe.toml"
        recipe.write_bytes(_choice(rng, [b"precision = 'fp17'\n", b"[shapes]\nbatch = 3\n", b"\xff\xfe", b"target = [\n", b"[verify]\natol = -1\n", b"runs = 'x'\n"]))
        return "bad recipe", ["--config", str(recipe)]
    if choice == 5:
        return "missing recipe", ["--config", str(sandbox / "nope.toml")]
    if choice == 6:
        return "unknown pass", ["--disable-pass", _choice(rng, ["nope", "", "fp8"])]
    if choice == 7:
        return "io dtype without fp16", ["--io-dtype", "float16"]
    return "unknown option", [_choice(rng, ["--frobnicate", "--shapes", "--target"])]


def _engine_copy(rng, sandbox: Path, source: Path, damage_rate: float) -> tuple[str, Path]:
    engine = sandbox / "engine_out"
    shutil.copytree(source, engine)
    if rng.random() < damage_rate:
        return inputs.damage_engine(rng, engine / "engine"), engine
    choice = int(rng.integers(0, 6))
    if choice == 0:
        return "engine path missing", sandbox / "nope"
    if choice == 1:
        (sandbox / "a_file").write_text("not an engine")
        return "engine path is a file", sandbox / "a_file"
    return "good engine", engine


def run_case(rng, sandbox: Path, engines: dict) -> Case:
    engine_kind, engine = _engine_copy(rng, sandbox, engines["block"], 0.3)
    feeds = sandbox / "in.npz"
    good = {"x": np.random.default_rng(int(rng.integers(0, 100))).standard_normal((2, 8, 64)).astype(np.float32)}
    if rng.random() < 0.6:
        array_kind = inputs.bad_array_file(rng, feeds, good)
    else:
        np.savez(feeds, **good)
        array_kind = _choice(rng, ["good inputs", "inputs is a dir", "inputs missing"])
        if array_kind == "inputs is a dir":
            feeds = sandbox / "in_dir"
            feeds.mkdir()
        elif array_kind == "inputs missing":
            feeds = sandbox / "missing.npz"
    out_kind, out = _output_path(rng, sandbox, "out.npz", "file")
    return Case("run", f"{engine_kind}; {array_kind}; {out_kind}", ["run", str(engine), "--inputs", str(feeds), "--output", str(out)], out)


def bench_case(rng, sandbox: Path, engines: dict) -> Case:
    engine_kind, engine = _engine_copy(rng, sandbox, engines["block"], 0.5)
    extra = _choice(rng, [[], [], ["--runs", "0"], ["--warmup", "-1"], ["--runs", "x"], ["--seed", "-5"]])
    # A later --runs or --warmup wins over the defaults before it.
    return Case("bench", f"{engine_kind}; {' '.join(extra) or 'defaults'}", ["bench", str(engine), "--runs", "2", "--warmup", "0", *extra])


def _serve_output(rng, sandbox: Path) -> tuple[str, Path, list[str]]:
    choice = int(rng.integers(0, 8))
    if choice == 0:
        return "video out", sandbox / "out.mp4", []
    if choice == 1:
        return "gif out", sandbox / "out.gif", []
    if choice == 2:
        kind, path = _output_path(rng, sandbox, "frames", "dir")
        return f"{kind} --force", path, ["--force"]
    kind, path = _output_path(rng, sandbox, "frames", "dir")
    return kind, path, []


def decode_case(rng, sandbox: Path, engines: dict) -> Case:
    engine_kind, engine = _engine_copy(rng, sandbox, engines["vae"], 0.2)
    if rng.random() < 0.1:
        engine_kind, engine = "not a VAE engine", engines["block"]
    latents = sandbox / "latents.npy"
    latents_kind = inputs.bad_latents(rng, latents)
    out_kind, out, extra = _serve_output(rng, sandbox)
    extra += _choice(rng, [[], [], ["--chunk", "0"], ["--chunk", "8"], ["--chunk", "1"], ["--workers", "0"], ["--fps", "0"], ["--serial"]])
    return Case("decode", f"{engine_kind}; {latents_kind}; {out_kind}", ["decode", str(engine), str(latents), "-o", str(out), *extra], out)


def interpolate_case(rng, sandbox: Path, engines: dict) -> Case:
    engine_kind, engine = _engine_copy(rng, sandbox, engines["film"], 0.15)
    if rng.random() < 0.1:
        engine_kind, engine = "not a FILM engine", engines["vae"]
    frames = sandbox / "frames_in"
    frames_kind = inputs.frames_folder(rng, frames)
    if rng.random() < 0.1:
        frames_kind, frames = "input is a text file", sandbox / "clip.txt"
        frames.write_text("not a video")
    elif rng.random() < 0.05:
        frames_kind, frames = "corrupt video", sandbox / "clip.mp4"
        frames.write_bytes(inputs.random_bytes(rng, b""))
    out_kind, out, extra = _serve_output(rng, sandbox)
    extra += _choice(rng, [[], [], ["--factor", "3"], ["--factor", "0"], ["--factor", "4"], ["--workers", "1"], ["--serial"]])
    return Case("interpolate", f"{engine_kind}; {frames_kind}; {out_kind}", ["interpolate", str(engine), str(frames), "-o", str(out), *extra], out)


def example_case(rng, sandbox: Path, engines: dict) -> Case:
    name = _choice(rng, ["block", "block", "block", "nope", "", "BLOCK", "../block", "vae"])
    kind, directory = _output_path(rng, sandbox, "ex", "dir")
    extra = ["--force"] if rng.random() < 0.3 else []
    return Case("example", f"{name or 'empty name'}; {kind}{' --force' if extra else ''}", ["example", name, str(directory), *extra], directory)


MAKERS = {"optimize": optimize_case, "compare": compare_case, "run": run_case, "bench": bench_case, "decode": decode_case,
          "interpolate": interpolate_case, "example": example_case}  # fmt: skip


def signal_case(rng, sandbox: Path, engines: dict, command: str) -> Case:
    """A good job of command, stopped by SIGINT or SIGTERM at a random moment, in its own process."""
    while True:
        case = MAKERS[command](rng, sandbox, engines)
        if "good" in case.kind or command in ("bench", "example"):
            break
        shutil.rmtree(sandbox)
        sandbox.mkdir()
    signum = SIGNALS[int(rng.integers(0, 2))]
    # From half a second: before that, Python may still be starting, before kiln's handlers exist.
    case.signal = (signum, float(rng.uniform(0.5, 4.0)))
    case.kind = f"{signum.name} at {case.signal[1]:.1f}s; {case.kind}"
    return case


def full_disk_case(rng, sandbox: Path, engines: dict, command: str) -> Case:
    """A command whose writes fail past a file-size limit, as on a full disk, in its own process."""
    case = MAKERS[command](rng, sandbox, engines)
    case.file_size_limit = int(rng.choice([1, 1000, 50_000, 150_000]))
    case.kind = f"disk full at {case.file_size_limit} bytes; {case.kind}"
    return case
