"""How many of the model classes diffusers' own test suite covers kiln imports and verifies: each case of
tests/optimizer/diffusers_suite.py (the suite's tiny configurations) written, imported (exported and
checked against PyTorch in fp32), then built and verified in fp16 on the cpu target.

    python benchmarks/diffusers_coverage.py [--only SUBSTRING] [--no-fp16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "optimizer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument("--no-fp16", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    import diffusers_suite as suite

    results = []
    for kind, cases in (("transformer", suite.TRANSFORMERS), ("vae", suite.VAES)):
        for case in cases:
            if args.only not in case.name:
                continue
            with tempfile.TemporaryDirectory(prefix="kiln-suite-") as work:
                result = {"kind": kind, **suite.run(case, work, fp16=not args.no_fp16)}
            results.append(result)
            first = lambda text: text if text in (None, "ok") else text.splitlines()[0][:150]  # noqa: E731
            print(f"{case.name:<52} {result['seconds']:>6.1f} s  fp32 {first(result['fp32'])}  fp16 {first(result['fp16'])}", flush=True)
    for kind in ("transformer", "vae"):
        mine = [r for r in results if r["kind"] == kind]
        classes = {r["case"].split("[")[0] for r in mine}
        ok32 = {r["case"].split("[")[0] for r in mine} - {r["case"].split("[")[0] for r in mine if r["fp32"] != "ok"}
        ok16 = ok32 - {r["case"].split("[")[0] for r in mine if r["fp16"] != "ok"}
        print(f"{kind}s: {len(ok32)} of {len(classes)} classes import and verify in fp32, {len(ok16)} in fp16 too "
              f"({len(mine)} cases, {sum(r['seconds'] for r in mine):.0f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
