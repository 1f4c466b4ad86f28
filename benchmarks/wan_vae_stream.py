"""Wan 2.1's VAE decoding a clip chunk after chunk: kiln's step engine through `kiln decode` (the frame pipeline,
caches kept on the device) against diffusers' own decode, on the same latents, in one run.

    python benchmarks/wan_vae_stream.py [--work DIR] [--runs 3] [--latents 9,60,104]   # H100 / H200: auto target (this GPU's), fp16
    python benchmarks/wan_vae_stream.py --smoke                       # here: the tiny test config, cpu target

AutoencoderKLWan at diffusers' defaults (Wan 2.1's VAE, random weights, seeded), latents 16x9x60x104: 33 frames
of 480x832. Steps:
1. `kiln optimize --video-decoder step --target auto --precision fp16` at the clip's size only; the import is
   checked on the GPU against diffusers' decode, chunk after chunk, the engine against the fp32 export;
2. diffusers' decode, bf16 and fp32, on the GPU: median wall time of --runs decodes, frames per second;
3. `kiln decode` of the same latents to a folder of PNGs: frames per second of the whole pipeline (engine,
   copies, encoding overlapped), GPU busy and engine busy from CUDA events, and PSNR of its frames against
   diffusers' fp32 decode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {"frames": 9, "height": 60, "width": 104}
SMOKE = {"frames": 3, "height": 6, "width": 6}


def kiln(*args: str) -> dict:
    """A kiln command with --json, its progress on this terminal; its JSON, or exit on failure."""
    cli = "import sys; from kiln.optimizer.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", cli, *args, "--json"], stdout=subprocess.PIPE, text=True)
    result = json.loads(done.stdout or "{}")
    if done.returncode not in (0, 3):  # 3: built, verification missed its tolerance (reported below)
        sys.exit(f"kiln {args[0]} failed ({done.returncode}): {result}")
    return result


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def latent_sizes(text: str) -> dict:
    """--latents 'F,H,W' as sizes; argparse turns the ValueError into a usage error (exit 2)."""
    values = text.split(",")
    if len(values) != 3 or not all(v.strip().isdigit() and int(v) > 0 for v in values):
        raise ValueError(text)
    return dict(zip(("frames", "height", "width"), map(int, values), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kiln-wan-vae-stream"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny config of diffusers' tests on the cpu target")
    parser.add_argument("--latents", type=latent_sizes, help="latent frames,height,width (default 9,60,104: 33 frames of 480x832)")
    parser.add_argument("--profile", action="store_true", help="then the top CUDA kernels of diffusers' bf16 decode and of kiln's")
    args = parser.parse_args()

    import cv2
    from diffusers import AutoencoderKLWan

    sizes = SMOKE if args.smoke else SIZES
    sizes = args.latents or sizes
    device = "cpu" if args.smoke else "cuda"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        torch.manual_seed(0)
        config = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]) if args.smoke else {}
        AutoencoderKLWan(**config).save_pretrained(vae_dir)
    h, w = sizes["height"], sizes["width"]
    engine = work / f"step-{'smoke' if args.smoke else 'fp16'}-{h}x{w}"
    if not (engine / "report.json").exists():
        target = ["--target", "cpu"] if args.smoke else ["--target", "auto", "--precision", "fp16"]
        report = kiln("optimize", str(vae_dir), "-o", str(engine), "--video-decoder", "step", *target, "--bench-runs", "0",
                      "--shapes", "batch=1", "--shapes", f"height={h}", "--shapes", f"width={w}")  # fmt: skip
        print(f"kiln optimize: {report.get('status', report.get('error'))}", flush=True)
    latents = torch.randn(1, 16, sizes["frames"], h, w, generator=torch.Generator().manual_seed(1))
    np.save(work / "z.npy", latents.numpy())

    rows = []
    model = AutoencoderKLWan.from_pretrained(vae_dir).eval().to(device)
    frames = 1 + 4 * (sizes["frames"] - 1)
    with torch.no_grad():
        for dtype in (torch.float32,) if args.smoke else (torch.bfloat16, torch.float32):
            model.to(dtype)
            z = latents.to(device, dtype)
            times = []
            for _ in range(args.runs + 1):  # the first warms up
                start = time.perf_counter()
                out = model.decode(z).sample
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times[1:]))
            rows.append((f"diffusers decode {str(dtype)[6:]}", frames / seconds, None, None))
            if dtype == torch.float32:
                want = ((out[0].float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    out_dir = work / "frames"
    result = kiln("decode", str(engine), str(work / "z.npy"), "-o", str(out_dir), "--force")
    got = np.stack([cv2.imread(str(out_dir / f"frame_{i:06d}.png"))[:, :, ::-1] for i in range(frames)])
    rows.append(("kiln decode (step engine, pipeline)", result["fps"], result.get("gpu_busy"), result.get("engine_busy")))
    print(f"\nWan VAE decode, latents {list(latents.shape)} -> {frames} frames of {8 * h}x{8 * w}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")  # fmt: skip
    print("\n| runner | frames/s | GPU busy | engine busy |\n|---|---|---|---|")
    for name, fps, busy, engine_busy in rows:
        cell = lambda v: "" if v is None else f"{v:.0%}"  # noqa: E731
        print(f"| {name} | {fps:.1f} | {cell(busy)} | {cell(engine_busy)} |")
    print(f"\nkiln's frames against diffusers' fp32 decode: PSNR {psnr(got, want):.1f} dB")
    if args.profile:
        profile(vae_dir, latents, engine, work)


def profile(vae_dir: Path, latents: torch.Tensor, engine: Path, work: Path) -> None:
    """Kernel time by kind of one bf16 diffusers decode and of one `kiln decode` (the engine loaded once)."""
    from diffusers import AutoencoderKLWan
    from gpu_common import profile_kernels

    from kiln.optimizer.serve.jobs import decode, open_backend

    decoder = AutoencoderKLWan.from_pretrained(vae_dir).eval().to("cuda", torch.bfloat16).decode
    z = latents.to("cuda", torch.bfloat16)
    with torch.no_grad():
        profile_kernels("diffusers decode bf16", lambda: decoder(z), runs=2)
    decoder = None
    torch.cuda.empty_cache()
    backend = open_backend(engine)
    profile_kernels("kiln decode", lambda: decode(backend, work / "z.npy", work / "frames", force=True), runs=2)


if __name__ == "__main__":
    main()
