"""Run the conformance suite and print the counts: verified, refused by reason, failed, internal.

    python -m tests.conformance.run --all --precision fp32 fp16 --json counts.json
    python -m tests.conformance.run --sample 120 --seed 0 --precision fp16
    python -m tests.conformance.run -k resize_ -k stft --precision fp32 fp16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter

from .cases import Case, light_cases, node_cases
from .runner import STATUSES, run_cases


def select(cases: list[Case], sample: int | None, seed: int, patterns: list[str]) -> list[Case]:
    """The cases whose names match any pattern (all without patterns), or a seeded sample of them."""
    chosen = [c for c in cases if not patterns or any(re.search(p, c.name) for p in patterns)]
    if sample is not None and sample < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, sample), key=lambda c: c.name)
    return chosen


def counts(results: list[dict]) -> dict:
    """Per precision: how many cases had each status, and the refusals and failures by reason."""
    summary = {}
    for precision in dict.fromkeys(r["precision"] for r in results):
        mine = [r for r in results if r["precision"] == precision]
        summary[precision] = {
            **{status: sum(r["status"] == status for r in mine) for status in STATUSES},
            **{f"{status}_by_reason": dict(Counter(r["reason"] for r in mine if r["status"] == status).most_common())
               for status in ("refused", "failed", "internal")},  # fmt: skip
        }
    return summary


def table(summary: dict, results: list[dict]) -> str:
    lines = []
    for precision, c in summary.items():
        lines.append(f"{precision}: {c['verified']} verified, {c['refused']} refused, {c['failed']} failed, {c['internal']} internal")
        for status in ("refused", "failed", "internal"):
            for reason, n in c[f"{status}_by_reason"].items():
                lines.append(f"  {status:<9}{n:>5}  {reason}")
    bad = [r for r in results if r["status"] in ("failed", "internal")]
    if bad:
        lines.append("failed and internal cases:")
        lines += [f"  {r['status']:<9}{r['precision']:<5} {r['name']}: {r['message'].splitlines()[0][:160] if r['message'] else r['reason']}"
                  for r in sorted(bad, key=lambda r: (r["status"], r["name"], r["precision"]))]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every node test and light model")
    which.add_argument("--sample", type=int, metavar="N", help="a seeded sample of N node tests, and every light model")
    which.add_argument("-k", dest="patterns", action="append", metavar="REGEX", help="the cases whose names match (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one case may take before it counts as a hang")
    parser.add_argument("--json", metavar="FILE", help="write the counts and every case's outcome to FILE")
    parser.add_argument("--verbose", action="store_true", help="print each case's outcome as it comes, and let ONNX Runtime log")
    args = parser.parse_args(argv)

    nodes, lights = node_cases(), light_cases()
    cases = select(nodes, args.sample, args.seed, args.patterns or []) + select(lights, None, 0, args.patterns or [])
    start = time.monotonic()
    done = []

    def progress(result: dict) -> None:
        done.append(result)
        if args.verbose:
            print(f"{result['status']:<9}{result['precision']:<5} {result['name']} {result['reason']}", flush=True)
        elif len(done) % 100 == 0:
            print(f"{len(done)} of {len(cases) * len(args.precision)} runs, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

    results = run_cases(cases, args.precision, args.jobs, args.timeout, quiet=not args.verbose, on_result=progress)
    summary = counts(results)
    print(table(summary, results))
    print(f"{len(results)} runs in {time.monotonic() - start:.0f} s with {args.jobs} worker(s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"counts": summary, "cases": sorted(results, key=lambda r: (r["name"], r["precision"]))}, f, indent=1)
    return 1 if any(c["internal"] for c in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
