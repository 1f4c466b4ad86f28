"""Optimization profiles from the shapes requests come in: a request list (or histogram) or a preset,
grouped into at most K buckets so that little work goes to padding. `kiln optimize --profile-from`
builds one profile per bucket (`--profiles K`, default: AUTO_RULE) and reports the waste of 1 to 4.

A bucket is one profile: per dim, the smallest and largest size of its requests (min and max) and the
size of its most frequent request (opt). Its padding waste is the share of the work spent on padding
if every request ran at the bucket's max, as a static engine of that bucket runs it: for a request of
H x W in a bucket whose max is Hm x Wm, 1 - H*W / (Hm*Wm), weighted by how often it comes. Buckets are
made by merging, two at a time, the pair whose merge adds the least padded work, until K are left.
Sizes are first rounded up to the model's alignment (FILM's 64), which the engine pads to anyway.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import math
from pathlib import Path

from kiln.optimizer.errors import InputError

# Presets: request shapes as (height, width), equally frequent. Phones: portrait 9:16 and 3:4, square
# 1:1 and landscape 16:9, each at the 720- and 1080-pixel short sides common on phone screens and cameras.
PRESETS: dict[str, list[dict[str, int]]] = {
    "phone": [{"height": h, "width": w} for h, w in ((1280, 720), (1920, 1080), (960, 720), (1440, 1080),
                                                      (720, 720), (1080, 1080), (720, 1280), (1080, 1920))],  # fmt: skip
    "video-720p": [{"height": 720, "width": 1280}],
    "video-1080p": [{"height": 1080, "width": 1920}],
}
SPLITS = (1, 2, 3, 4)  # the report gives the waste with each of these many profiles
AUTO_MAX, AUTO_WASTE = 4, 0.10
AUTO_RULE = f"the fewest profiles, up to {AUTO_MAX}, whose padding waste is at most {AUTO_WASTE:.0%}"


@dataclasses.dataclass(frozen=True)
class Bucket:
    requests: tuple[tuple[tuple[int, ...], int], ...]  # (sizes in dim order, count)

    @property
    def count(self) -> int:
        return sum(n for _, n in self.requests)

    def low(self) -> tuple[int, ...]:
        return tuple(min(col) for col in zip(*(s for s, _ in self.requests), strict=True))

    def high(self) -> tuple[int, ...]:
        return tuple(max(col) for col in zip(*(s for s, _ in self.requests), strict=True))

    def opt(self) -> tuple[int, ...]:
        """The most frequent request's sizes (the largest of those as frequent)."""
        return max(self.requests, key=lambda r: (r[1], r[0]))[0]

    def padded_work(self) -> int:
        """Elements computed for padding if every request ran at the bucket's max."""
        full = math.prod(self.high())
        return sum(n * (full - math.prod(s)) for s, n in self.requests)

    def waste(self) -> float:
        return self.padded_work() / (self.count * math.prod(self.high()))


def read_requests(source: str) -> tuple[str, list[dict[str, int]]]:
    """(what the source is, its request shapes with counts) from a preset name or a JSON file: a list
    of {DIM: size, ..., "count": n} (count defaults to 1), or {"requests": [...]}."""
    if source in PRESETS:
        return f"preset {source}", [{**r, "count": 1} for r in PRESETS[source]]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"--profile-from {source}: no such file, and no preset of that name",
                         hint=f"give a JSON file of request shapes, or a preset: {', '.join(PRESETS)}")  # fmt: skip
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"--profile-from {path} is not valid JSON ({exc})") from None
    requests = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(requests, list) or not requests:
        raise InputError(f"--profile-from {path}: expected a non-empty list of request shapes",
                         hint='e.g. [{"height": 1920, "width": 1080, "count": 40}, ...]')  # fmt: skip
    checked = []
    for i, request in enumerate(requests):
        where = f"--profile-from {path}: request {i}"
        if not isinstance(request, dict):
            raise InputError(f"{where} is not an object of dim sizes")
        values = {k: v for k, v in request.items()}
        values.setdefault("count", 1)
        bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise InputError(f"{where}: {bad[0]} is {values[bad[0]]!r}, not a whole number of 1 or more")
        checked.append(values)
    return str(path), checked


def bucket_requests(requests: list[dict[str, int]], dims: list[str], buckets: int, align: dict[str, int] | None = None) -> list[Bucket]:
    """At most `buckets` buckets of the requests (each {dim: size, "count": n}) over dims, the sizes
    first rounded up to align[dim]. A request that names other dims is an InputError naming both."""
    if buckets < 1:
        raise InputError(f"--profiles {buckets}: at least 1")
    groups = shape_counts(requests, dims, align)
    return merged_down(groups, {buckets})[min(buckets, len(groups))]


def shape_counts(requests: list[dict[str, int]], dims: list[str], align: dict[str, int] | None = None) -> list[Bucket]:
    """One bucket per distinct request shape (after alignment), in shape order."""
    counts: dict[tuple[int, ...], int] = {}
    for i, request in enumerate(requests):
        named = set(request) - {"count"}
        if named != set(dims):
            raise InputError(f"request {i} gives {', '.join(sorted(named)) or 'no dims'}, and the profile is over {', '.join(dims)}",
                             hint="give every request the same dims, by the model's names (a fixed dim needs no profile)")  # fmt: skip
        sizes = tuple(-(-request[d] // (align or {}).get(d, 1)) * (align or {}).get(d, 1) for d in dims)
        counts[sizes] = counts.get(sizes, 0) + request["count"]
    return [Bucket(((sizes, n),)) for sizes, n in sorted(counts.items())]


def merged_down(groups: list[Bucket], sizes: set[int]) -> dict[int, list[Bucket]]:
    """Merge the pair of buckets whose merge adds the least padded work, again and again, down to the
    smallest of sizes; {count: buckets (smallest max first)} at each of sizes passed on the way, and at
    the end. A heap of pair costs, extended only for each new bucket: about N^2 log N for N shapes."""
    alive = dict(enumerate(groups))
    heap = [(_merge_cost(a, b), i, j) for (i, a), (j, b) in itertools.combinations(alive.items(), 2)]
    heapq.heapify(heap)
    found, fresh = {}, len(groups)
    while True:
        if len(alive) in sizes or len(alive) <= min(sizes):
            found[len(alive)] = sorted(alive.values(), key=lambda g: math.prod(g.high()))
        if len(alive) <= min(sizes):
            return found
        cost, i, j = heapq.heappop(heap)
        if i not in alive or j not in alive:
            continue  # a pair with a bucket merged since
        merged = Bucket(tuple(sorted(alive.pop(i).requests + alive.pop(j).requests)))
        for k, other in alive.items():
            heapq.heappush(heap, (_merge_cost(merged, other), k, fresh))
        alive[fresh] = merged
        fresh += 1


def _merge_cost(a: Bucket, b: Bucket) -> int:
    return Bucket(a.requests + b.requests).padded_work() - a.padded_work() - b.padded_work()


def waste_of(groups: list[Bucket]) -> float:
    """The padding waste of all requests together."""
    padded = sum(g.padded_work() for g in groups)
    computed = sum(g.count * math.prod(g.high()) for g in groups)
    return padded / computed


def buckets_json(groups: list[Bucket], dims: list[str]) -> list[dict]:
    return [{"dims": {d: {"min": lo, "opt": op, "max": hi} for d, lo, op, hi in zip(dims, g.low(), g.opt(), g.high(), strict=True)},
             "requests": g.count, "shapes": len(g.requests), "waste": round(g.waste(), 4)} for g in groups]  # fmt: skip


def choose_count(shapes: list[Bucket], asked: int | str) -> tuple[int, dict[int, list[Bucket]]]:
    """(how many profiles, {count: buckets} for it and for SPLITS): asked, or for "auto" the fewest up to
    AUTO_MAX whose padding waste is at most AUTO_WASTE (AUTO_MAX if none is)."""
    wanted = set(SPLITS) | ({min(asked, len(shapes))} if isinstance(asked, int) else set(range(1, AUTO_MAX + 1)))
    found = merged_down(shapes, {k for k in wanted if k <= len(shapes)})
    found = {k: v for k, v in found.items() if k in wanted}
    if isinstance(asked, int):
        return min(asked, len(shapes)), found
    fits = [k for k in sorted(found) if k <= AUTO_MAX and waste_of(found[k]) <= AUTO_WASTE]
    return (fits[0] if fits else min(AUTO_MAX, len(shapes))), found


@dataclasses.dataclass
class Synthesis:
    section: dict  # the report's: the requests, the profiles chosen and their padding waste, the waste of 1 to 4
    specs: list[tuple[str, str]]  # --shapes specs of the range the requests span (min, most frequent, max)
    buckets: list[dict[str, tuple[int, int, int]]]  # the profiles, {dim: (min, opt, max)}, if several
    shapes: list[dict[str, int]]  # each request shape, aligned


def synthesize(source: str, model_dims: list[str], align: dict[str, int], asked: int | str = "auto") -> Synthesis:
    """The profiles for the dims the requests name; dims they do not name come from --shapes."""
    where, requests = read_requests(source)
    named = [d for d in requests[0] if d != "count"]
    unknown = [d for d in named if d not in model_dims]
    if unknown:
        raise InputError(f"--profile-from {source}: {unknown[0]!r} is not a dynamic dim of the model, whose dynamic dims are {', '.join(model_dims) or 'none'}",
                         hint="name the model's dims (`kiln optimize` notes them), e.g. height and width")  # fmt: skip
    shapes = shape_counts(requests, named, align)
    whole = Bucket(tuple(r for g in shapes for r in g.requests))
    count, splits = choose_count(shapes, asked)
    chosen = splits[count]
    specs = [(f"--profile-from {source}", f"{d}={lo}..{op}..{hi}") for d, lo, op, hi in zip(named, whole.low(), whole.opt(), whole.high(), strict=True)]
    section = {
        "source": where, "requests": whole.count, "shapes": len(whole.requests), "aligned_to": {d: align[d] for d in named if d in align},
        "asked": asked, "rule": None if asked != "auto" else AUTO_RULE if waste_of(chosen) <= AUTO_WASTE else f"{AUTO_RULE}: none is, so {count}", "profiles": buckets_json(chosen, named), "waste": round(waste_of(chosen), 4),
        "split": [{"profiles": k, "waste": round(waste_of(splits[k]), 4)} for k in sorted(splits)],
    }  # fmt: skip
    buckets = [{d: (lo, op, hi) for d, lo, op, hi in zip(named, g.low(), g.opt(), g.high(), strict=True)} for g in chosen] if count > 1 else []
    return Synthesis(section, specs, buckets, [dict(zip(named, sizes, strict=True)) for sizes, _ in whole.requests])
