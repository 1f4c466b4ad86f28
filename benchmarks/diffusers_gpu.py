"""Today's diffusers models at real size on one GPU, every runner side by side in one process.

    python benchmarks/diffusers_gpu.py flux [--runs 10] [--precisions bf16,fp16] [--profile]
    python benchmarks/diffusers_gpu.py wan [--runs 5] [--precisions fp16,bf16] [--profile]

flux: FluxTransformer2DModel at Flux.1-dev's widths (hidden 3072, 24 heads of 128, guidance embedding)
with reduced depth, 2 double-stream and 4 single-stream blocks, at 1024² (latents 16x128x128: 4096 image
tokens) with 512 text tokens, batch 1.
wan: WanTransformer3DModel at Wan 2.1 T2V 1.3B's published configuration (30 blocks, hidden 1536), at
480x832 and 33 frames (latents 16x9x60x104: 14,040 tokens) with 512 text tokens, batch 1.
Wan's VAE is timed chunk after chunk in wan_vae_stream.py: as one whole-clip fp16 engine at 480x832x33f it
failed in ONNX Runtime's CUDA Transpose with narrowing_error, a size past 32 bits (H100, 2026-12-05).

Random weights, seeded. Runners: PyTorch eager bf16, torch.compile bf16, and kiln's h100 target (Hopper:
the H200 too) with the shapes frozen, run as one CUDA graph. kiln exports with dynamic sizes at a small
shape (the rotary tables follow the sizes) and freezes them at the case's. Every runner reads
device-resident inputs and writes device-resident outputs; the torch runners call the model as the
pipelines do (packed latents and position ids for Flux), through kiln's adapter. The table gives the
median, the speed-up against the fastest baseline, and the max relative error against PyTorch fp32 with
TF32 off. --profile adds the top CUDA kernels of kiln's first engine and of torch.compile. --ort-disable
OPT,... adds kiln's engines built and loaded with those ONNX Runtime optimizers left out in place of the
target's own list (the CUDA targets leave out MatMulAddFusion); `--ort-disable none` leaves out none.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import kiln_engine, print_table, profile_kernels, rel_err  # noqa: E402
from kiln.optimizer.bench import median_ms  # noqa: E402

# Flux.1-dev's transformer config with 2 + 4 blocks instead of 19 + 38.
FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))  # fmt: skip
# Wan2.1-T2V-1.3B's transformer config (its published config.json).
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)  # fmt: skip
VIDEO = {"batch": 1, "frames": 9, "height": 60, "width": 104}  # 33 frames of 480x832

# model: (class, config, export ranges (small opt: export runs the model once on the CPU), benchmark sizes)
MODELS = {
    "flux": ("FluxTransformer2DModel", FLUX,
             ["batch=1..1..2", "height=16..32..128", "width=16..32..128", "text_len=16..32..512"],
             {"batch": 1, "height": 128, "width": 128, "text_len": 512}),
    "wan": ("WanTransformer3DModel", WAN,
            ["batch=1..1..2", "frames=2..3..9", "height=16..24..60", "width=16..32..104", "text_len=16..32..512"],
            {**VIDEO, "text_len": 512}),
}  # fmt: skip


@contextlib.contextmanager
def ort_without(optimizers: tuple[str, ...] | None):
    """ONNX Runtime sessions made inside leave these graph optimizers out (a kiln engine's build and load), in
    place of the target's own list; None keeps the target's."""
    import onnxruntime as ort

    original = ort.InferenceSession.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, **({"disabled_optimizers": list(optimizers)} if optimizers is not None else {})})

    ort.InferenceSession.__init__ = init
    try:
        yield
    finally:
        ort.InferenceSession.__init__ = original


def build_model(name: str):
    import diffusers

    cls, config, _, _ = MODELS[name]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--precisions", help="kiln precisions to build (default: bf16,fp16 for flux, fp16,bf16 for wan)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of kiln and torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--work", type=Path, help="working folder; an export found there (model.onnx) is reused")
    parser.add_argument("--ort-disable", help="also build kiln's engines with these ONNX Runtime graph optimizers left out "
                        "in place of the target's list (comma-separated, or none), and time them beside the others")
    parser.add_argument("--export-only", action="store_true", help="stop after the export (to run it in its own call)")
    args = parser.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from kiln.optimizer.importers.diffusers import export
    from kiln.optimizer.importers.diffusion_adapters import adapter_for, fmt_sizes, make_inputs, resolve_ranges
    from kiln.targets import H100, DimRange

    ort.preload_dlls()
    ort.set_default_logger_severity(3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = args.work or Path(tempfile.mkdtemp(prefix=f"kiln-{args.model}-"))
    work.mkdir(parents=True, exist_ok=True)
    _, _, export_ranges, sizes = MODELS[args.model]
    case = f"{args.model} {fmt_sizes(sizes)}"
    default = {"flux": "bf16,fp16", "wan": "fp16,bf16"}[args.model]
    precisions = (args.precisions or default).split(",")

    model = build_model(args.model)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, {case}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, onnxruntime {ort.__version__}", flush=True)  # fmt: skip
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [("bench", spec) for spec in export_ranges])
    raw = work / "model.onnx"
    if raw.exists():
        print(f"kiln export: reusing {raw}")
    else:
        start = time.perf_counter()
        record = export(model, adapter, ranges, raw)
        print(f"kiln export: {record['exporter']} exporter at {fmt_sizes(record['export_sizes'])}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    if args.export_only:
        return

    tensors = make_inputs(adapter, sizes, seed=1)
    feeds = {rule.name: t.numpy() for rule, t in zip(adapter.inputs, tensors, strict=True)}
    model.cuda()
    on_gpu = [t.cuda() for t in tensors]
    with torch.no_grad():
        want = adapter.call(model, *on_gpu).cpu().numpy()
    rows = []
    model.to(torch.bfloat16)
    low = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in on_gpu]
    runners = {"torch eager bf16": model}
    if not args.no_compile:
        runners["torch.compile bf16"] = torch.compile(model)
    with torch.no_grad():
        for name, module in runners.items():
            def call(module=module):
                out = adapter.call(module, *low)
                torch.cuda.synchronize()
                return out

            start = time.perf_counter()
            out = call()
            print(f"{name}: first run {time.perf_counter() - start:.0f} s", flush=True)
            rows.append((case, name, median_ms(call, args.runs), rel_err(out.float().cpu().numpy(), want)))
        if args.profile and "torch.compile bf16" in runners:
            profile_kernels("torch.compile bf16", lambda: adapter.call(runners["torch.compile bf16"], *low), runs=3)
    del runners, model
    torch.cuda.empty_cache()

    static = {name: DimRange(v, v, v) for name, v in sizes.items()}
    other = None if args.ort_disable is None else tuple(n for n in args.ort_disable.split(",") if n not in ("", "none"))
    variants = [(p, None) for p in precisions] + [(p, other) for p in precisions if other is not None]
    for i, (precision, disabled) in enumerate(variants):
        name = f"kiln h100 {precision} static (CUDA graph)"
        if disabled is not None:
            name += f", ORT without {'+'.join(disabled) or 'nothing'}"
        try:
            with ort_without(disabled):
                engine, records = kiln_engine(ir.load(raw), Path(tempfile.mkdtemp(prefix=precision, dir=work)), H100, precision, static)
            print(f"  fusions: {next((r.stats for r in records if r.name == 'ort-fusions'), {})}", flush=True)
            output = engine.run(feeds)[engine.outputs[0].name]
            rows.append((case, name, median_ms(engine.device_runner(feeds), args.runs), rel_err(output, want)))
            if args.profile and (i == 0 or disabled is not None):
                profile_kernels(f"kiln {precision}", engine.device_runner(feeds), runs=3)
            del engine
        except Exception as exc:  # report a precision ORT cannot run, and go on
            print(f"  {name} failed: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        print_table(rows)  # so far, in case a later build fails
    print("\nFinal table")
    print_table(rows)


if __name__ == "__main__":
    main()
