"""`kiln optimize --target auto` on DiT-XL/2 (random weights at real size) at 256² batch 8, fp16: which
target it picked, the report's cost per 1,000 results (measured here, estimated elsewhere by the
roofline model), and the refusal of the same engine with its recorded compute capability edited.

    python benchmarks/target_cost.py WORK [--runs 50] [--small]

--small runs the tiny example DiT (on the cpu target where there is no GPU) to try the script anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()

    model_dir = args.work / ("dit-small" if args.small else "dit-xl-2")
    if not (model_dir / "config.json").exists():
        if args.small:
            subprocess.run([*KILN, "example", "dit", str(model_dir), "-q"], check=True)
        else:
            from dit_gpu import dit_xl_2

            dit_xl_2().save_pretrained(model_dir, safe_serialization=True)
    shapes = ["--shapes", "batch=2", "--shapes", "height=16"] if args.small else ["--shapes", "batch=8", "--shapes", "height=32"]
    out = args.work / "engine"
    started = time.perf_counter()
    done = subprocess.run([*KILN, "optimize", str(model_dir), "-o", str(out), "--force", "--target", "auto", "--precision", "fp16",
                           *shapes, "--bench-runs", str(args.runs), "--json"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    report = json.loads(done.stdout)
    cache = (report.get("cache") or {}).get("status", "off")
    print(f"kiln optimize: exit {done.returncode}, status {report.get('status')}, target {report['target']['name']}, "
          f"engine cache {cache}, {time.perf_counter() - started:.1f} s")  # fmt: skip
    print(next((n for n in report["notes"] if n.startswith("target auto")), "no target auto note"))
    work = report["work"].get("opt") or next(iter(report["work"].values()))  # a static profile's one corner
    print(f"FLOPs per run: {work['flops'] / 1e12:.3f} TFLOP (uncounted: {work['uncounted']}), weights {work['weight_bytes'] / 1e9:.3f} GB")
    cost = report["cost"]
    print(cost["reason"] if "reason" in cost else f"measured on {cost['gpu']}: {cost['results_per_run']} results per run")
    print("\n| target | ms per run | bound | of peak | $ per hour | $ per 1,000 results | basis |\n|---|---|---|---|---|---|---|")
    for r in cost["rows"]:
        if r["basis"] == "none":
            print(f"| {r['target']} | - | - | - | - | - | {r['reason']} |")
            continue
        fraction = f"{r['roofline_fraction']:.0%}" if r.get("roofline_fraction") is not None else "-"
        print(f"| {r['target']} | {r['ms_per_run']:.3f} | {r['bound']} | {fraction} | {r['usd_per_hour']:.3f} | "
              f"{r['usd_per_1000_results']:.5f} | {r['basis']} |")  # fmt: skip

    foreign = args.work / "foreign"
    shutil.rmtree(foreign, ignore_errors=True)
    shutil.copytree(out, foreign)
    manifest = foreign / "engine" / "engine.json"
    body = json.loads(manifest.read_text())
    if "compute_capability" not in body["built_with"]:
        print("\nthe engine recorded no GPU (a CPU engine): no refusal to show")
        return
    body["built_with"]["compute_capability"] = "8.9"
    manifest.write_text(json.dumps(body))
    refused = subprocess.run([*KILN, "bench", str(foreign), "--runs", "2"], capture_output=True, text=True)
    print(f"\nkiln bench on the engine with compute capability edited to 8.9: exit {refused.returncode}")
    print(refused.stderr.strip() or refused.stdout.strip())


if __name__ == "__main__":
    main()
