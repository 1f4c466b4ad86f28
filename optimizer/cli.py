"""The `kiln` command line. Each subcommand is a small function over the library; errors become one message."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from kiln.optimizer import __version__
from kiln.optimizer.config import BACKENDS, CALIB_METHODS, DEFAULT_CALIB_SAMPLES, FORMATS, IO_DTYPES, PRECISIONS, VIDEO_DECODERS, check_seed
from kiln.optimizer.compare_grid import MAX_POINTS, OR
from kiln.optimizer.errors import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, InputError, KilnError

DESCRIPTION = """\
kiln takes a trained model to a fast, verified inference engine for a target, and runs it.

  kiln example block ex/                 write a small example model to ex/model.onnx
  kiln optimize ex/model.onnx -o out/    optimize, build, verify and benchmark it
  kiln run out/ --inputs in.npz --output out.npz
  kiln bench out/                        latency at each shape of the engine's profile
  kiln compare ex/model.onnx -o sweep/ --grid precision=fp32,fp16 --grid quantize=none,int8
                                         one engine per setting: quality against latency
  kiln targets                           what each target can do, and whether it runs here
  kiln interpolate film-out/ clip.mp4 -o smooth.mp4 --factor 4
                                         FILM in-betweens: a video or frame folder at 4x the rate
  kiln decode vae-out/ latents.npy -o frames/
                                         a VAE decoder over a sequence of latents, chunk by chunk
  kiln serve dit-out/ --replicas 1..4    serve engines over HTTP (KServe v2) on Ray Serve
  kiln batch film-out/ jobs.jsonl -o out/
                                         many clips through Ray Data, resumably

MODEL is an .onnx file, a TensorFlow SavedModel (kiln-ml[tf]; `kiln example film f/`) or a diffusers
model directory (kiln-ml[torch]; `kiln example dit d/`, `kiln example vae v/`).

Exit codes: 0 ok, 1 a bug in kiln or a failing pass, 2 bad input (nothing written), 3 verification
failed (OUTDIR still written), 130 interrupted (Ctrl-C, SIGTERM), 141 stdout closed by its reader.
"""

OPTIMIZE_EPILOG = """\
shapes:
  Each dynamic dim of the model's inputs needs a range. Name it by its symbolic name or by
  INPUT:AXIS, e.g. --shapes batch=1..8 --shapes seq=16..128..512 (min..opt..max; opt defaults
  to the middle). The engine is verified at opt and at every corner: each dim at its min or max,
  in every combination (a covering set of them above 4 dims).

recipe (--config recipe.toml; command-line options win):
  target = "cpu"
  precision = "fp16"
  [shapes]
  batch = "1..8"
  [int_ranges]
  class_labels = "0..999"
  [passes]
  disable = ["cse"]
  [verify]
  seed = 0
  inputs = ["sample.npz"]   # relative to the recipe
  atol = 1e-3        # rtol too; defaults depend on precision
  [bench]
  runs = 20
  warmup = 3
  [tensorrt]
  opt_level = 3      # TensorRT targets; time_limit = SECONDS for NAME-trt

OUTDIR gets model.onnx, engine/, report.json and report.md. It is built in a temporary
directory and renamed into place, so a failed run leaves what was there before.

engine cache:
  An engine that passed verification (or, built without its GPU, awaits `kiln verify`) is
  stored in $KILN_CACHE_DIR (default ~/.cache/kiln) under a key of the
  model's bytes, the options, the target, kiln's code, the library versions and, for a GPU
  target, the GPU, driver, CUDA and cuDNN. The same run again copies it from there ("cache hit");
  a miss says which of those differ from the nearest entry. `kiln cache` lists and prunes it.
"""


BUILD_DESCRIPTION = """\
Build every cell of a matrix with `kiln optimize`, each through the engine cache, into
OUTDIR/<model>-<target>-<precision>[-<quantize>]/, and write OUTDIR/build.json: each cell's
status, engine, verification, latency at the opt shape, cost where it was measured, and cache hit.

matrix (TOML; an unknown key is an error):
  models = ["film", {path = "dit", name = "dit-xl", shapes = {batch = "1..8"}}]  # relative to the file
  targets = ["cpu", "h100-trt"]
  precisions = ["fp32", "fp16"]
  quantize = ["none", "int8"]      # optional
  profile_from = "phone"           # optional: --profile-from for every model (or per model)
  [shapes]                         # optional: dims of every model (a model's own win)
  height = "64..256"

A GPU cell on a machine without that GPU is built and marked "not-verified" (`kiln verify` finishes
it there). A cell that cannot be built here (a TensorRT plan without TensorRT), or whose target refuses
its precision or quantization, is skipped with the reason (a failure with --strict). Exit codes: 0 every cell built and verified (or
skipped), 3 some verification failed, 1 some build failed, 2 a bad matrix. Without
--keep-going the matrix stops at the first failure; the cells after it are "not run".
"""


COMPARE_DESCRIPTION = """\
Build one engine per point of a grid of `kiln optimize` settings, through kiln optimize's own build, and
measure each the same way: latency (median and p90; on a GPU with inputs and outputs on the device),
engine size, device memory, and quality against the fp32 model on the same held-out inputs (relative
L2, PSNR, SSIM; for diffusers models on the final latents of seeded sampling loops). Where the model's
framework is installed, baseline rows run it on the same inputs (PyTorch eager, and on a GPU torch.compile
with and without CUDA graphs; TensorFlow for SavedModels); an ONNX model gets ONNX Runtime with its own
optimizer.
"""

COMPARE_EPILOG = f"""\
grid:
  --grid quantize=none,int8,fp8 --grid calib-samples=32,128
  Options: precision, io-dtype, quantize, quant-backend, calib-samples, calib-method, smoothquant,
  keep, quality, disable-pass. 'none' leaves the option out. --or starts another grid, and the sweep
  is the union: --grid precision=fp16,bf16 --or --grid precision=fp16 --grid quantize=int8,fp8 gives
  fp16, bf16, and INT8 and FP8 with fp16 elsewhere. Every combination is a point; a setting
  that does not apply (calib-samples without quantize) is dropped and the duplicate points merged; a
  point the target cannot run (FP8 on the cpu target) is listed as skipped, with the reason. More than
  {MAX_POINTS} points need --yes. Everything else (--target, --shapes, --calib, --seed, import options)
  is shared by every point. A recipe gives the grid in its [compare] section:
    [compare.grid]
    quantize = ["none", "int8"]
    calib-samples = [32, 128]
  or several as [[compare.grid]] tables. --grid on the command line replaces the recipe's grids.

OUTDIR:
  compare.json   every point: its options, status, metrics (schema kiln-compare, versioned)
  compare.md     the table, fastest first, Pareto-optimal points marked
  pareto.png     quality against latency, one labelled dot per point
  samples.png    the same inputs through the reference and each point, with the differences
  points/KEY/    each point's OUTDIR (what `kiln optimize` writes), KEY hashing the model, the
                 options, the target, kiln's own code and the library versions

  A point is stored when it is done, so an interrupted sweep resumes where it stopped, and a rerun
  builds nothing it has. A point that fails gets its error in its row, and the sweep goes on.
"""


def _common() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print only machine-readable JSON on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (warnings and errors still)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kiln", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common()
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("optimize", parents=[common], help="optimize a model into a verified engine", epilog=OPTIMIZE_EPILOG, formatter_class=raw)
    p.add_argument("model", type=Path, metavar="MODEL", help="an .onnx file (external data beside it is fine), a directory holding one, a TensorFlow SavedModel, or a diffusers model directory (save_pretrained)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="directory to write the engine and reports to")
    p.add_argument("--force", action="store_true", help="replace OUTDIR even if it is not a kiln output")
    p.add_argument("--no-cache", action="store_true", help="build even if the engine cache has this engine, and do not store it there")
    _engine_options(p)
    p.set_defaults(handler=cmd_optimize)

    p = sub.add_parser("compare", parents=[common], help="sweep precision and quantization settings: quality against latency",
                       description=COMPARE_DESCRIPTION, epilog=COMPARE_EPILOG, formatter_class=raw)
    p.add_argument("model", type=Path, metavar="MODEL", help="what `kiln optimize` takes")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="directory for compare.json, compare.md, "
                   "pareto.png, samples.png and each point's engine (points/); a rerun into it resumes")
    p.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2", help="an option of `kiln optimize` (without --) "
                   "and the values to try; repeat to multiply (none: the option left out)")
    p.add_argument("--or", dest="grid", action="append_const", const=OR, help="start another grid: the sweep is the union of the grids' points")
    p.add_argument("--yes", action="store_true", help=f"run a grid of more than {MAX_POINTS} points")
    p.add_argument("--retry-failed", action="store_true", help="build again the points that failed in an earlier run (they are cached too)")
    _engine_options(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("run", parents=[common], help="run an engine on inputs from an .npz file")
    p.add_argument("engine", type=Path, metavar="OUTDIR", help="a directory `kiln optimize` wrote")
    p.add_argument("--inputs", type=Path, required=True, metavar="in.npz", help="one array per model input, by name")
    p.add_argument("--output", type=Path, required=True, metavar="out.npz", help="where to write the outputs")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("bench", parents=[common], help="latency (median, p90) at each shape of the engine's profile, and cost per 1,000 results")
    p.add_argument("engine", type=Path, metavar="OUTDIR", help="a directory `kiln optimize` wrote")
    p.add_argument("--runs", type=int, default=50, help="timed runs per shape (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("verify", parents=[common], help="build and verify, on its GPU, an engine `kiln optimize` built on a machine without it",
                       description="`kiln optimize --target GPU` on a machine without that GPU runs every pass and writes the model, "
                                   "the manifest and the verification cases, and marks the engine not yet verified. Run this on the GPU "
                                   "machine: it builds the engine there, verifies it on those cases (exit 3 if it fails), benchmarks it, "
                                   "and records it in the manifest and the report.")  # fmt: skip
    p.add_argument("engine", type=Path, metavar="OUTDIR", help="a directory `kiln optimize` wrote without the target's GPU")
    p.add_argument("--bench-runs", type=int, default=10, help="timed runs per profile shape for the report (default 10; 0 skips)")
    p.set_defaults(handler=cmd_verify)

    where = ("Engine compute, the copy to host and encoding run overlapped. An engine built for cuda or h100 runs on "
             "the GPU (needs torch with CUDA): frames become uint8 there and are copied on a second CUDA stream into "
             "pinned host buffers; a cpu engine runs the same pipeline on the host.")
    serve = _Parser(add_help=False)
    serve.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="a folder (frames written as frame_000000.png, ...) or a video file (.mp4, .avi, .mov, .mkv; encoded on the CPU)")
    serve.add_argument("--workers", type=_positive(int), help="post-processing workers (default: enough to keep up, from the measured encode cost)")
    serve.add_argument("--serial", action="store_true", help="run compute, copy and encoding one after another, with no overlap (for comparison)")
    serve.add_argument("--format", choices=["png", "jpg"], default="png", help="image format for a folder OUTPUT (default png)")
    serve.add_argument("--force", action="store_true", help="write over an existing OUTPUT")
    serve.add_argument("--report", type=Path, metavar="FILE.json", help="also write the run's metrics to this file")

    p = sub.add_parser("interpolate", parents=[common, serve], help="FILM frame interpolation of a video or a folder of frames",
                       description="FILM frame interpolation (the authors' recursive mid-points). " + where)
    p.add_argument("engine", type=Path, metavar="ENGINE_DIR", help="an OUTDIR `kiln optimize` wrote from a FILM SavedModel")
    p.add_argument("input", type=Path, metavar="INPUT", help="a folder of frames (in name order) or a video file; any size (padded to the model's alignment)")
    p.add_argument("--factor", type=int, default=2, help="frames out per frame in, a power of two: n frames become (n-1)*factor+1 (default 2)")
    p.add_argument("--fps", type=_positive(float), help="frame rate of a video OUTPUT (default: the input's times factor; 30 for folders)")
    p.set_defaults(handler=cmd_interpolate)

    p = sub.add_parser("decode", parents=[common, serve], help="decode a sequence of latents through a VAE-decoder engine, chunk by chunk",
                       description="Decode latents through a VAE-decoder engine, a chunk at a time; or one clip through "
                       "a video VAE's step decoder (kiln optimize --video-decoder step), a step at a time (1 latent frame for "
                       "Wan and Magvit, 2 for CogVideoX), its caches carried from run to run on the device. " + where)  # fmt: skip
    p.add_argument("engine", type=Path, metavar="ENGINE_DIR", help="an OUTDIR `kiln optimize` wrote from a diffusers AutoencoderKL, "
                   "or from a video VAE with --video-decoder step")
    p.add_argument("latents", type=Path, metavar="LATENTS.npy", help="float latents [frames, channels, height, width]; for a step "
                   "decoder one clip's [channels, frames, height, width] (or with a batch of 1 in front, as pipelines return them)")
    p.add_argument("--chunk", type=int, help="frames decoded per engine run (default: the engine's batch if its profile "
                   "is static, else 8; a step decoder takes its own step)")
    p.add_argument("--fps", type=_positive(float), default=24.0, help="frame rate of a video OUTPUT (default 24)")
    p.set_defaults(handler=cmd_decode)

    p = sub.add_parser("targets", parents=[common], help="list targets: each GPU's compute capability, memory, peaks and price, and whether it runs here",
                       description="The targets kiln builds for. Per GPU: compute capability, memory, bandwidth, dense fp16 and FP8 "
                                   "TFLOP/s from the datasheet, on-demand $ per GPU-hour, the precisions it runs fast, and whether "
                                   "it runs on this machine (and why not). --json adds every figure's source.")  # fmt: skip
    p.set_defaults(handler=cmd_targets)

    p = sub.add_parser("build", parents=[common], help="build a matrix of engines for CI: models x targets x precisions x quantization",
                       description=BUILD_DESCRIPTION, formatter_class=raw)
    p.add_argument("matrix", type=Path, metavar="MATRIX.toml", help="the matrix (format below)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR", help="one folder per cell, and build.json for all")
    p.add_argument("--keep-going", action="store_true", help="build every cell even after one fails (default: stop at the first failure)")
    p.add_argument("--strict", action="store_true", help="count cells that cannot build here (no TensorRT, another GPU) as failures, not skipped")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("cache", parents=[common], help="list, inspect and prune the engine cache ($KILN_CACHE_DIR, default ~/.cache/kiln)",
                       description="The engine cache `kiln optimize` stores verified engines in (see `kiln optimize --help`).")  # fmt: skip
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("list", parents=[common], help="every entry: key, target, precision, size, model, last use")
    a.set_defaults(handler=cmd_cache)
    a = actions.add_parser("info", parents=[common], help="one entry: its key's parts, its files and whether they are whole")
    a.add_argument("key", metavar="KEY", help="an entry's key, or the start of one (`kiln cache list`)")
    a.set_defaults(handler=cmd_cache)
    a = actions.add_parser("prune", parents=[common], help="remove unfinished and damaged entries, and with --max-size the least recently used")
    a.add_argument("--max-size", type=_size, metavar="SIZE", help="evict least recently used entries until the cache holds at most SIZE (500M, 20G, or bytes)")
    a.set_defaults(handler=cmd_cache)

    p = sub.add_parser("passes", parents=[common], help="list the passes kiln runs, in order")
    p.set_defaults(handler=cmd_passes)

    p = sub.add_parser("example", parents=[common], help="write an example model that needs nothing downloaded")
    p.add_argument("name", metavar="NAME", help="block (ONNX transformer block), film (FILM SavedModel; needs [tf]), dit or vae (diffusers; need [torch]), "
                   "dit-trained (a small DiT kiln trained, for quantization quality; [torch]; kiln ships its weights)")
    p.add_argument("directory", type=Path, metavar="DIR", help="directory to write it to")
    p.add_argument("--force", action="store_true", help="replace an existing model in DIR")
    p.set_defaults(handler=cmd_example)

    from kiln.optimizer import cluster_cli, triton_cli

    cluster_cli.add_commands(sub, common, _positive, _size)
    triton_cli.add_commands(sub, common, _positive)
    return parser


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The options that say how to import, build, verify and measure an engine: `kiln optimize` takes them
    all, and `kiln compare` takes them as the settings every point shares (its grid varies some)."""
    p.add_argument("--target", help="target to build for (default cpu; auto: the one for this machine's GPU; see `kiln targets`)")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default fp32); sensitive ops stay fp32 and the report lists them")
    p.add_argument("--force-precision", action="store_true", help="build --precision even for a model kiln refuses it for (fp16 for Flux, whose activations overflow float16)")
    p.add_argument("--io-dtype", choices=IO_DTYPES, help="dtype of the engine's float inputs and outputs (default float32; float16 with --precision fp16 drops the boundary casts)")
    p.add_argument("--shapes", action="append", default=[], metavar="NAME=MIN..MAX", help="range of a dynamic dim; repeat per dim")
    p.add_argument("--profile-from", metavar="FILE|PRESET", help="make the profiles from request shapes: a JSON list of {DIM: size, count: n} "
                   "or a preset (phone, video-720p, video-1080p), grouped into --profiles; the report gives their padding waste")
    p.add_argument("--profiles", type=_profile_count, metavar="K|auto", help="how many profiles --profile-from makes, each run by a session of its own "
                   "(default auto: the fewest, up to 4, whose padding waste is at most 10%%); a request runs on the smallest that holds it")
    p.add_argument("--int-range", action="append", default=[], metavar="NAME=LO..HI", help="values of an integer input in verification and benchmark data, both ends included (default 1..7); repeat per input")
    p.add_argument("--verify-inputs", action="append", default=[], metavar="in.npz", help="also verify the engine on these sample inputs (one array per model input, by name); repeatable")
    p.add_argument("--config", type=Path, metavar="recipe.toml", help="read options from a TOML recipe")
    p.add_argument("--verify-each", action="store_true", help="after every pass: checker, ORT load and parity (slow; finds the pass that breaks a model)")
    p.add_argument("--no-verify", action="store_true", help="skip the final parity check (a failed check exits 3 otherwise)")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME", help="skip a pass by name (`kiln passes` lists them)")
    p.add_argument("--seed", type=int, help="seed for verification and benchmark inputs (default 0)")
    p.add_argument("--bench-runs", type=int, help="timed runs per profile shape for the report (default 10; 0 skips)")
    g = p.add_argument_group("quantization (8-bit weights and activations; the report lists each layer)")
    g.add_argument("--quantize", choices=FORMATS, help="int8 (W8A8, per-channel weights) or fp8 (E4M3; GPUs of compute capability 8.9+)")
    g.add_argument("--calib", metavar="PATH", help="calibration inputs: a folder of .npz files (one sample each) or one .npz (a sample, or a stack of them); default: random samples")
    g.add_argument("--calib-samples", type=int, metavar="N", help=f"calibrate on the first N samples of --calib, or on N made ones (default {DEFAULT_CALIB_SAMPLES})")
    g.add_argument("--calib-method", choices=CALIB_METHODS, help="activation ranges: max, percentile (99.99) or entropy (KL, as TensorRT); default entropy for int8, max for fp8")
    g.add_argument("--smoothquant", type=float, metavar="ALPHA", help="INT8: move activation outliers into the weights first (SmoothQuant; 0.5 is usual)")
    g.add_argument("--keep", action="append", default=[], metavar="REGEX", help="also keep layers whose module path or node name matches in float; repeatable")
    g.add_argument("--quality", metavar="BUDGET", help="keep the fewest layers in float that meet it: psnr>=DB, ssim>=S, rel_l2<=E or max_abs<=E "
                   "(on sampling-loop latents for diffusers models, else on held-out outputs)")
    g.add_argument("--quant-backend", choices=BACKENDS, help="who inserts Q/DQ: kiln (default; FP8 becomes GemmFloat8 on CUDA), ort (quantize_static, INT8; default on the cpu target) or modelopt (NVIDIA ModelOpt, for TensorRT)")
    g = p.add_argument_group("TensorRT (targets NAME-trt and NAME-ort-trt)")
    g.add_argument("--trt-opt-level", type=int, metavar="0-5", help="TensorRT's builder optimization level: higher searches longer for faster kernels (default 3)")
    g.add_argument("--trt-time-limit", type=float, metavar="SECONDS", help="stop a NAME-trt build that runs longer, exit 2 (default: no limit)")
    g = p.add_argument_group("TensorFlow SavedModel import")
    g.add_argument("--signature", help="signature to convert (default serving_default)")
    g.add_argument("--outputs", type=lambda s: s.split(","), metavar="A,B", help="outputs to keep (default: image, if there is one, else all); the rest are pruned with what feeds only them")
    g.add_argument("--opset", type=int, help="ONNX opset for the conversion (default 17)")
    g.add_argument("--layout", choices=["nhwc", "nchw"], help="image layout at the model's boundary (default nhwc, as the signature has it)")
    g.add_argument("--align", type=int, metavar="N", help="pad H and W to multiples of N in the engine (default 64 for FILM, else 1)")
    g.add_argument("--import-timeout", type=float, metavar="SECONDS", help="stop the conversion after this long (default 1800)")
    g = p.add_argument_group("diffusers model import")
    g.add_argument("--trust-pickle", action="store_true", help="load pickle (.bin/.ckpt) weights; they can run code when loaded, so only for files you trust")
    g.add_argument("--video-decoder", choices=VIDEO_DECODERS, help="a video VAE's decoder as one graph over the whole clip (clip, the default) "
                   "or as a step function, one step of diffusers' decode loop with its causal convolutions' caches in and out, for "
                   "`kiln decode` to run step after step in one step's memory (step: AutoencoderKLWan; CogVideoX's and Magvit's "
                   "decoders take this form without it)")


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"kiln: warning: {warning}", file=sys.stderr)


# The stdout a command's --json result goes to; what libraries print meanwhile goes to stderr (see main).
_JSON_STDOUT: contextvars.ContextVar = contextvars.ContextVar("kiln_json_stdout", default=None)


def _emit(args, data, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True), file=_JSON_STDOUT.get() or sys.stdout)
    else:
        print(text)


def _profile_count(text: str) -> int | str:
    return "auto" if text == "auto" else int(text) if text.isdigit() else text  # validate() says what is wrong


def options_from_args(args) -> "Options":
    """kiln optimize's options from its arguments: the recipe first, then the command line."""
    from kiln.optimizer.config import Options, load_recipe, validate

    options = Options()
    if args.config:
        load_recipe(args.config, options)
    for field in ("target", "precision", "io_dtype", "seed", "bench_runs", "signature", "outputs", "opset", "layout", "align", "import_timeout", "video_decoder",
                  "quantize", "calib", "calib_samples", "calib_method", "smoothquant", "quant_backend", "quality", "trt_opt_level", "trt_time_limit",
                  "profile_from", "profiles"):
        if getattr(args, field) is not None:
            setattr(options, field, getattr(args, field))
    options.shapes += [("--shapes", s) for s in args.shapes]
    options.int_ranges += [("--int-range", s) for s in args.int_range]
    options.verify_inputs += args.verify_inputs
    options.disable_passes += args.disable_pass
    options.keep += args.keep
    options.verify_each |= args.verify_each
    options.trust_pickle |= args.trust_pickle
    options.force_precision |= args.force_precision
    options.precision_chosen |= args.precision is not None
    options.verify &= not args.no_verify
    options.cache &= not getattr(args, "no_cache", False)
    validate(options)
    return options


def cmd_optimize(args) -> int:
    from kiln.optimizer.optimize import optimize
    from kiln.optimizer.progress import Progress

    options = options_from_args(args)
    report = optimize(args.model, args.output, options, args.force, Progress(enabled=not args.quiet))
    _emit(args, report, _built_text(report, args.output))
    return 0


def cmd_verify(args) -> int:
    from kiln.optimizer.deferred import verify_deferred
    from kiln.optimizer.progress import Progress

    if args.bench_runs < 0:
        raise InputError(f"--bench-runs {args.bench_runs}: must be 0 or more")
    report = verify_deferred(args.engine, args.bench_runs, Progress(enabled=not args.quiet))
    _emit(args, report, _built_text(report, args.engine))
    return 0


def _built_text(report: dict, outdir: Path) -> str:
    checks = report["verification"]["shapes"]
    verified = (f"not yet verified: run `kiln verify {outdir}` on a machine where {report['target']['name']} runs"
                if report["status"] == "not-verified" else f"verified at {sum(c['passed'] for c in checks)}/{len(checks)} shapes")  # fmt: skip
    return (f"{report['status']}: {report['source']['nodes']} -> {report['model']['nodes']} nodes, {verified}\n"
            f"report: {outdir / 'report.md'} (and report.json)")  # fmt: skip


def cmd_compare(args) -> int:
    from kiln.optimizer.compare import compare
    from kiln.optimizer.compare_grid import read_grid
    from kiln.optimizer.progress import Progress

    result = compare(args.model, args.output, read_grid(args), args.retry_failed, Progress(enabled=not args.quiet))
    counts = result["counts"]
    text = (f"{counts['ok']} of {counts['points']} points built and measured ({counts['built']} built now, {counts['cached']} "
            f"from the cache, {counts['skipped']} skipped, {counts['failed']} failed)\n"
            f"table: {args.output / 'compare.md'}; plot: {args.output / 'pareto.png'}; samples: {args.output / 'samples.png'}")
    _emit(args, result, text)
    return 0


def engine_flags(args) -> list[str]:
    """The engine options args holds (those not at their defaults), as `kiln optimize` flags."""
    parser = _Parser(add_help=False)
    _engine_options(parser)
    flags = []
    for action in parser._actions:
        value, flag = getattr(args, action.dest, None), action.option_strings[-1]
        if value is None or value is False or value == []:
            continue
        if value is True:
            flags.append(flag)
        elif action.dest == "outputs":
            flags += [flag, ",".join(value)]
        else:
            flags += [part for v in (value if isinstance(value, list) else [value]) for part in (flag, str(v))]
    return flags


def cmd_run(args) -> int:
    from kiln.optimizer.run import run_engine

    results, warnings = run_engine(args.engine, args.inputs, args.output)
    _warn(warnings)
    summary = {name: {"dtype": v.dtype.name, "shape": list(v.shape)} for name, v in results.items()}
    text = "\n".join(f"{n}: {s['dtype']} {s['shape']}" for n, s in summary.items()) + f"\nwrote {args.output}"
    _emit(args, {"outputs": summary, "file": str(args.output), "warnings": warnings}, text)
    return 0


def cmd_bench(args) -> int:
    from kiln.optimizer.bench import bench_profile, compute_format, cost_section
    from kiln.optimizer.report import cost_lines
    from kiln.optimizer.run import build_report, build_warnings, open_engine

    if args.runs < 1 or args.warmup < 0:
        raise InputError("--runs must be at least 1 and --warmup 0 or more")
    check_seed(args.seed, "--seed")
    engine = open_engine(args.engine)
    warnings = build_warnings(args.engine)
    _warn(warnings)
    results = bench_profile(engine, args.runs, args.warmup, args.seed)
    lines = [f"{'corner':<8} {'median ms':>10} {'p90 ms':>10}  shapes"]
    for r in results:
        shapes = ", ".join(f"{k} {v}" for k, v in r["shapes"].items())
        lines.append(f"{r['corner']:<8} {r['median_ms']:>10.3f} {r['p90_ms']:>10.3f}  {shapes}")
    built = build_report(args.engine)
    try:
        cost = cost_section(built.get("work"), results, engine, compute_format(built) if built else engine.config.precision)
    except (AttributeError, KeyError, TypeError, ValueError):  # a report.json damaged or edited by hand
        cost = {"measured_on": None, "reason": "no cost figures: the engine's report.json is damaged", "rows": []}
    lines += ["", *cost_lines(cost)]
    _emit(args, {"engine": str(args.engine), "runs": args.runs, "warmup": args.warmup, "results": results, "cost": cost,
                 "warnings": warnings}, "\n".join(lines).rstrip())  # fmt: skip
    return 0


def cmd_targets(args) -> int:
    from kiln import targets

    described = [t.describe() for t in targets.TARGETS.values()]
    device, gpu = targets.gpu_here()
    here = f"this machine: {device} ({f'target {gpu.name}' if gpu else 'no entry: target cuda'})" if device else "this machine: no CUDA GPU"
    lines = [here, "", f"{'target':<21} {'GPU':<46} {'sm':>4} {'GB':>4} {'GB/s':>5} {'fp16 TF':>7} {'fp8 TF':>6} "
             f"{'$/h':>6}  {'precisions':<24} runs here"]  # fmt: skip
    for t in described:
        gpu_row = t.get("gpu")
        state = "yes" if t["available"] else f"no: {t['unavailable_reason']}"
        label, figures, precisions = t["description"], ("",) * 6, t["precisions"]
        if gpu_row is not None:
            precisions = t["precisions"] + t["quantize"]
            label = gpu_row["gpu"]
            if t["family"] == "tensorrt":
                label = "  via ONNX Runtime's TensorRT provider" if t["name"].endswith("-ort-trt") else "  as a TensorRT plan kiln builds"
        if gpu_row is not None and t["family"] != "tensorrt":
            peak = gpu_row["peak_tflops"]
            figures = (gpu_row["compute_capability"], f"{gpu_row['memory_gb']:g}", f"{gpu_row['bandwidth_gb_s']:g}", f"{peak['fp16']:g}",
                       f"{peak['fp8']:g}" if "fp8" in peak else "-", f"{gpu_row['usd_per_hour']:.2f}")  # fmt: skip
        sm, gb, bandwidth, fp16, fp8, price = figures
        lines.append(f"{t['name']:<21} {label[:46]:<46} {sm:>4} {gb:>4} {bandwidth:>5} {fp16:>7} {fp8:>6} {price:>6}  "
                     f"{','.join(precisions):<24} {state}")  # fmt: skip
    lines += ["", "Peaks are dense tensor-core TFLOP/s from each vendor datasheet; prices are on-demand per GPU-hour "
              "(sources: `kiln targets --json`, and targets/<architecture>.py).",
              "The TensorRT variants (NAME-trt, NAME-ort-trt) have never been run: TensorRT cannot be installed where kiln is built."]  # fmt: skip
    _emit(args, {"here": {"gpu": device, "target": gpu.name if gpu else None}, "targets": described}, "\n".join(lines))
    return 0


def cmd_build(args) -> int:
    from kiln.optimizer.build_matrix import build, summary_text
    from kiln.optimizer.progress import Progress

    summary = build(args.matrix, args.output, args.keep_going, args.strict, Progress(enabled=not args.quiet))
    _emit(args, summary, summary_text(summary))
    return summary["exit_code"]


def _size(text: str) -> int:
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number, unit = text.rstrip("KMGTkmgtB").strip(), text[len(text.rstrip("KMGTkmgtB")):].upper().rstrip("B")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T (500M, 20G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is 0 or more")
    return int(value)


def cmd_cache(args) -> int:
    import datetime

    from kiln.optimizer.engine_cache import EngineCache, flatten

    cache = EngineCache()
    if args.action == "prune":
        removed = cache.prune(args.max_size)
        left = cache.list()
        size = sum(r["bytes"] for r in left)
        _emit(args, {"cache": str(cache.root), "removed": removed, "entries": len(left), "bytes": size},
              "\n".join([*removed, f"{cache.root}: removed {len(removed)}, kept {len(left)} entries ({size / 1e6:.1f} MB)"]))  # fmt: skip
        return 0
    entries = cache.list()
    if args.action == "list":
        lines = [f"{cache.root}: {len(entries)} entries, {sum(r['bytes'] for r in entries) / 1e6:.1f} MB", ""]
        if entries:
            lines.append(f"{'key':<24}  {'target':<14} {'precision':<9} {'MB':>8}  {'last used':<16}  model")
        for r in entries:
            options = r["parts"].get("options", {})
            used = datetime.datetime.fromtimestamp(r["last_used"]).strftime("%Y-%m-%d %H:%M")
            precision = options.get("precision", "?") + (f"+{options['quantize']}" if options.get("quantize") else "")
            lines.append(f"{r['key']:<24}  {r['parts'].get('target', '?'):<14} {precision:<9} {r['bytes'] / 1e6:>8.1f}  {used:<16}  {r.get('source', '')}")
        _emit(args, {"cache": str(cache.root), "entries": entries}, "\n".join(lines))
        return 0
    matches = [r for r in entries if args.key and r["key"].startswith(args.key)]
    if len(matches) != 1:
        raise InputError(f"{'no entry' if not matches else f'{len(matches)} entries'} of {cache.root} has a key starting {args.key!r}",
                         hint="`kiln cache list` shows the keys; give enough of one to pick it")  # fmt: skip
    record = matches[0]
    damage = cache.damage(cache.entries / record["key"])
    record["whole"], record["damage"] = damage is None, damage
    flat = "\n".join(f"  {k}: {v}" for k, v in flatten(record["parts"]).items())
    text = (f"entry {record['key']} ({record['bytes'] / 1e6:.1f} MB), built {record['built']}: "
            f"{'whole' if damage is None else f'DAMAGED, {damage}'}\nfiles: {', '.join(sorted(record['files']))}\nkey parts:\n{flat}")  # fmt: skip
    _emit(args, record, text)
    return 0


def _serve(args, job) -> int:
    from kiln.optimizer.outdir import atomic_file
    from kiln.optimizer.run import build_warnings
    from kiln.optimizer.serve.jobs import open_backend

    backend = open_backend(args.engine)
    warnings = build_warnings(args.engine)
    _warn(warnings)
    result = job(backend, progress=not args.quiet)
    _warn(result.get("warnings", []))
    result["warnings"] = warnings + result.get("warnings", [])
    if args.report:
        with atomic_file(args.report) as tmp:
            tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    busy = f"GPU busy {result['gpu_busy']:.1%}" if "gpu_busy" in result else f"compute busy {result['compute_busy']:.0%}"
    text = (f"ok: {result['frames']} frames to {result['output']} in {result['wall_s']:.2f}s ({result['fps']:.1f} fps; "
            f"{busy}, {result['workers']} post-processing worker(s))")  # fmt: skip
    _emit(args, result, text)
    return 0


def cmd_interpolate(args) -> int:
    from kiln.optimizer.serve.jobs import interpolate

    return _serve(args, lambda backend, progress: interpolate(
        backend, args.input, args.output, args.factor, args.workers, args.serial, args.format, args.fps, args.force, progress))


def cmd_decode(args) -> int:
    from kiln.optimizer.serve.jobs import decode

    return _serve(args, lambda backend, progress: decode(
        backend, args.latents, args.output, args.chunk, args.workers, args.serial, args.format, args.fps, args.force, progress))


def cmd_passes(args) -> int:
    from kiln import passes, targets
    from kiln.optimizer.build import select_passes
    from kiln.optimizer.config import Options

    everything = select_passes(Options(precision="fp16"), targets.CUDA, static_sizes={})
    everything.insert(-1, passes.FuseStandardOnnx())  # the CPU's and TensorRT's instead of ort-fusions
    listed = [{"name": p.name, "summary": p.summary} for p in everything]
    # With --quantize: quantize before the precision pass, and on FP8 GPU targets the lowering after it.
    listed.insert(-1, {"name": passes.Quantize.name, "summary": passes.Quantize.summary + " (with --quantize)"})
    listed.append({"name": passes.LowerFp8Gemm.name, "summary": passes.LowerFp8Gemm.summary + " (FP8 on CUDA)"})
    _emit(args, {"passes": listed}, "\n".join(f"{p['name']:<20} {p['summary']}" for p in listed))
    return 0


def cmd_example(args) -> int:
    from kiln.optimizer.examples import write_example
    from kiln.optimizer.progress import Progress

    path = write_example(args.name, args.directory, args.force, Progress(enabled=not args.quiet))
    _emit(args, {"example": args.name, "model": str(path)}, f"wrote {path}\nnext: kiln optimize {path} -o out/")
    return 0


def _positive(kind: type):
    """An argparse type: a number of kind (int or float) above zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not value > 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be {'at least 1' if kind is int else 'above 0'}, got {text}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors become InputError, so they get the same one message (and JSON) as any bad input."""

    def error(self, message: str):
        error = UsageError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` shows the usage, with examples")
        error.usage = self.format_usage().rstrip()
        raise error


class UsageError(InputError):
    usage = ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so the same cleanup runs as for Ctrl-C."""


class _Signals:
    """SIGINT and SIGTERM raise where the program is until kiln has its exit code; from then on (its
    message, the interpreter's shutdown, which can take a second with torch loaded) they change nothing."""

    settled = False

    @classmethod
    def handle(cls, signum, frame):
        if not cls.settled:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted_inside(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that a library turned into its own error (an extension module's import
    fails with "initialization failed" when one lands inside it), if there is one in exc's chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(json_out: bool, exc: BaseException, code: int, label: str, message: str, hint: str | None) -> int:
    """One message on stderr and, with --json, the same as a JSON error object on stdout."""
    print(f"kiln: {label}: {message}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)
    if json_out:
        error = {"exit_code": code, "kind": type(exc).__name__, "message": message, "hint": hint}
        print(json.dumps({"error": error}, indent=2, sort_keys=True))
    return code


def _check_thread_cap() -> None:
    from kiln.targets.engine import EngineError, thread_cap

    try:
        thread_cap()
    except EngineError as exc:
        raise InputError(exc.message, hint=exc.hint) from None


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the `kiln` command, not a caller in the same process
    argv = sys.argv[1:] if argv is None else argv
    json_out, debug = "--json" in argv, "--debug" in argv
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        _Signals.settled = False
        handlers = {signum: signal.signal(signum, _Signals.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = build_parser().parse_args(argv)
        _check_thread_cap()
        # With --json, stdout holds the JSON alone: what libraries print meanwhile (an exporter's progress) goes to
        # stderr. The swap is process-wide, so only the main thread makes it.
        quiet = getattr(args, "json", False) and threading.current_thread() is threading.main_thread()
        token = _JSON_STDOUT.set(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext():
                code = args.handler(args)
        finally:
            _JSON_STDOUT.reset(token)
        _Signals.settled = True
        return code
    except KilnError as exc:
        _Signals.settled = True
        if debug:
            traceback.print_exc()
        if isinstance(exc, UsageError):
            print(exc.usage, file=sys.stderr)
        return _fail(json_out, exc, exc.exit_code, "error", exc.message, exc.hint)
    except KeyboardInterrupt as exc:
        _Signals.settled = True
        return _interrupted(json_out, exc)
    except BrokenPipeError:
        _Signals.settled = True
        # The reader of stdout has gone (`kiln targets | head -1`): say nothing more, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # anything else is kiln's bug: say so, keep the traceback for --debug
        _Signals.settled = True
        interrupt = _interrupted_inside(exc)
        if interrupt is not None:
            return _interrupted(json_out, interrupt)
        if debug:
            traceback.print_exc()
        return _fail(json_out, exc, EXIT_INTERNAL, "internal error", f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback")
    finally:
        for signum, handler in handlers.items():
            # The program ignores them to the end: Python's finalization would put back the default
            # action in place of a handler of its own, and a signal in the shutdown would then kill it.
            signal.signal(signum, signal.SIG_IGN if as_program else handler)
        if as_program:
            # CPython remembers a Ctrl-C that left code run from a string (dataclasses and namedtuple exec their
            # methods' source) and, under `python -m`, kills itself with SIGINT at exit in place of kiln's exit
            # code. Running a string to its end clears that memory.
            exec("pass")


def _interrupted(json_out: bool, exc: KeyboardInterrupt) -> int:
    what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
    return _fail(json_out, exc, EXIT_INTERRUPTED, "interrupted", f"{what}; nothing half-written was left", None)


if __name__ == "__main__":
    sys.exit(main())
