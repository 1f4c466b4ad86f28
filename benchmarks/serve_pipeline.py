"""The frame pipeline, serial against overlapped: the metrics and the table issue 6 asks for.

    python benchmarks/serve_pipeline.py interpolate ENGINE_DIR FRAMES_DIR [--factor 2] [--format png]
    python benchmarks/serve_pipeline.py decode ENGINE_DIR LATENTS.npy [--format png]
    python benchmarks/serve_pipeline.py gpu FILM_ONNX WORK_DIR      # the issue's GPU table, every case

`interpolate` and `decode` run one job on a built engine. `gpu` builds what it needs in WORK_DIR first
(no TensorFlow on the GPU machine, so FILM comes as kiln's stripped graph from
`benchmarks/film_gpu.py prepare`): FILM (default configuration) as a fp16 engine for this GPU (--target auto) frozen to
1080p (padded to 1088x1920) with 1080p input frames, and a real-size AutoencoderKL (Stable Diffusion's
layout, seeded random weights) whose decoder is a fp16 engine for this GPU for 4 latents of 64x64 (512²
frames) a run, with 64 latent frames. Then FILM factor 2 to JPEG and to PNG, and the VAE to PNG and JPEG.

Each job runs overlapped, then serially with the worker count the overlapped run chose from the
measured encode cost, into temporary folders, in one process on one engine. Overlap efficiency is
(T_serial - T_async) / (T_serial - T_slowest_stage); a stage's time is its total in the serial run:
reading, compute (GPU time from CUDA events on a GPU), the device-to-host copy, and post-processing
divided by the workers. The two runs' frames are compared: a race between the stages would show as
frames that differ (so would a nondeterministic kernel; the table says by how many levels). ONNX
Runtime's fused GroupNorm is one: the VAE's frames differ by a few levels from run to run, serial or
not (with that fusion disabled they are identical); JPEG turns such a difference into tens of levels.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

FILM_SIZE = (1080, 1920)
VAE_BATCH, VAE_LATENT = 4, 64
SD_VAE = dict(  # Stable Diffusion's AutoencoderKL layout: 84M parameters, 8x upsampling
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)  # fmt: skip


def compare(job: str, backend, source: Path, fmt: str, factor: int = 2, workers: int | None = None) -> dict:
    """Run job overlapped, then serially with the same workers; both results and the derived figures."""
    from kiln.optimizer.serve.jobs import decode, interpolate

    results, outputs = {}, {}
    for mode in ("async", "serial"):
        outputs[mode] = output = Path(tempfile.mkdtemp(prefix="kiln-serve-")) / "out"
        if job == "interpolate":
            result = interpolate(backend, source, output, factor, workers, mode == "serial", fmt)
        else:
            result = decode(backend, source, output, None, workers, mode == "serial", fmt)
        workers = result["workers"]
        results[mode] = result
    frames_differ = frame_difference(outputs["async"], outputs["serial"])
    for output in outputs.values():
        shutil.rmtree(output.parent)
    serial, overlapped = results["serial"], results["async"]
    stages = {
        "read": serial["read_s"],
        "compute": serial.get("gpu_compute_s", serial["compute_s"]),
        "copy": serial.get("d2h_s", serial["copy_s"]),
        "post": serial["post_s"] / workers,
    }
    slowest = max(stages, key=stages.get)
    room = serial["wall_s"] - stages[slowest]  # what overlap can save at best
    efficiency = (serial["wall_s"] - overlapped["wall_s"]) / room if room > 0.02 * serial["wall_s"] else None
    return {"results": results, "stages": stages, "slowest": slowest, "efficiency": efficiency,
            "speedup": serial["wall_s"] / overlapped["wall_s"], "frames_differ": frames_differ}  # fmt: skip


def frame_difference(a: Path, b: Path) -> str:
    """'none' when both folders hold the same files byte for byte, else how many frames differ and by
    how many levels at most (a nondeterministic kernel shows here, as well as a race)."""
    import cv2

    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return "different frame sets"
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    if not differ:
        return "none"
    levels = max(int(np.abs(cv2.imread(str(a / n)).astype(int) - cv2.imread(str(b / n)).astype(int)).max()) for n in differ)
    return f"{len(differ)} of {len(names)}, at most {levels} level(s)"


def print_table(rows: list[tuple[str, dict]]) -> None:
    print("\n| case | mode | frames | workers | wall s | fps | GPU busy | engine busy | GPU compute s | D2H GB/s | read s | post s (all workers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, c in rows:
        for mode, r in c["results"].items():
            busy = f"{r['gpu_busy']:.1%} | {r['engine_busy']:.1%}" if "gpu_busy" in r else f"{r['compute_busy']:.0%} (compute thread) | -"
            gpu = f"{r['gpu_compute_s']:.2f}" if "gpu_compute_s" in r else "-"
            d2h = f"{r['d2h_gb_per_s']:.1f}" if "d2h_gb_per_s" in r else "-"
            print(f"| {case} | {mode} | {r['frames']} | {r['workers']} | {r['wall_s']:.2f} | {r['fps']:.1f} | {busy} | {gpu} | {d2h} | "
                  f"{r['read_s']:.2f} | {r['post_s']:.2f} |")  # fmt: skip
    print("\n| case | serial s | async s | speed-up | slowest stage (serial) | overlap efficiency | frames that differ |\n|---|---|---|---|---|---|---|")
    for case, c in rows:
        serial, overlapped = c["results"]["serial"], c["results"]["async"]
        efficiency = "n/a: one stage is the whole run" if c["efficiency"] is None else f"{c['efficiency']:.1%}"
        print(f"| {case} | {serial['wall_s']:.2f} | {overlapped['wall_s']:.2f} | {c['speedup']:.2f}x | "
              f"{c['slowest']} {c['stages'][c['slowest']]:.2f} s | {efficiency} | {c['frames_differ']} |")  # fmt: skip


def kiln(*args) -> None:
    import contextlib
    import io

    from kiln.optimizer.cli import main as kiln_main

    with contextlib.redirect_stdout(io.StringIO()):  # the report is in the engine folder
        code = kiln_main([*map(str, args), "--json"])
    if code:
        raise SystemExit(f"kiln {' '.join(map(str, args))} failed")


def film_frames(folder: Path, count: int) -> Path:
    """count 1080p JPEG frames of a scene in motion: a gradient, textured discs moving, and sensor noise."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    height, width = FILM_SIZE
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = cv2.GaussianBlur(rng.uniform(0, 255, (height, width, 3)).astype(np.float32), (0, 0), 3)
    for k in range(count):
        image = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], axis=-1)
        for i in range(6):
            cx, cy = (200 + 250 * i + 12 * k) % width, (300 + 90 * i + 7 * k) % height
            disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (60 + 15 * i) ** 2
            image[disc] = texture[disc]
        image += rng.normal(0, 3, image.shape)
        cv2.imwrite(str(folder / f"in_{k:04d}.jpg"), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return folder


def build_gpu_cases(film_onnx: Path, work: Path, frames: int, latents: int) -> dict:
    import onnx
    import torch
    from diffusers import AutoencoderKL

    from weights import refill

    work.mkdir(parents=True, exist_ok=True)
    common = ["--target", "auto", "--precision", "fp16", "--bench-runs", "0"]
    if not (work / "film-engine").is_dir():
        onnx.save(refill(film_onnx), work / "film.onnx")
        kiln("optimize", work / "film.onnx", "-o", work / "film-engine", *common, "--no-verify",  # 1080p on the CPU: minutes
             "--shapes", "batch=1", "--shapes", "height=1088", "--shapes", "width=1920")  # fmt: skip
    if not (work / "vae-engine").is_dir():
        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE).save_pretrained(work / "vae")
        kiln("optimize", work / "vae", "-o", work / "vae-engine", *common,
             "--shapes", f"batch={VAE_BATCH}", "--shapes", f"height={VAE_LATENT}", "--shapes", f"width={VAE_LATENT}")  # fmt: skip
    np.save(work / "latents.npy", np.random.default_rng(0).standard_normal((latents, 4, VAE_LATENT, VAE_LATENT)).astype(np.float32))
    return {"frames": film_frames(work / "frames", frames), "latents": work / "latents.npy"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["interpolate", "decode", "gpu"])
    parser.add_argument("engine", type=Path, help="ENGINE_DIR; for gpu, kiln's stripped FILM graph")
    parser.add_argument("source", type=Path, help="frames or latents; for gpu, the work folder")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--format", choices=["png", "jpg"], default="png")
    parser.add_argument("--workers", type=int, help="default: chosen from the measured encode cost, as kiln does")
    parser.add_argument("--frames", type=int, default=32, help="gpu: 1080p input frames for FILM")
    parser.add_argument("--latents", type=int, default=64, help="gpu: latent frames for the VAE (enough that filling and draining the pipeline is a small part)")
    args = parser.parse_args()

    from kiln.optimizer.serve.jobs import open_backend

    if args.job != "gpu":
        rows = [(f"{args.job} {args.format}", compare(args.job, open_backend(args.engine), args.source, args.format, args.factor, args.workers))]
    else:
        inputs = build_gpu_cases(args.engine, args.source, args.frames, args.latents)
        film, vae = open_backend(args.source / "film-engine"), open_backend(args.source / "vae-engine")
        cases = [
            ("FILM 1080p x2 jpg", lambda: compare("interpolate", film, inputs["frames"], "jpg", 2, args.workers)),
            ("FILM 1080p x2 png", lambda: compare("interpolate", film, inputs["frames"], "png", 2, args.workers)),
            (f"VAE {VAE_LATENT * 8}² {args.latents} frames png", lambda: compare("decode", vae, inputs["latents"], "png", workers=args.workers)),
            (f"VAE {VAE_LATENT * 8}² {args.latents} frames jpg", lambda: compare("decode", vae, inputs["latents"], "jpg", workers=args.workers)),
        ]
        rows = []
        for name, case in cases:
            rows.append((name, case()))
            print_table(rows[-1:])  # as it finishes: a failure later keeps what was measured
        print("\nall cases:")
    print_table(rows)


if __name__ == "__main__":
    main()
