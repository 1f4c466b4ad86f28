"""Cost per 1,000 results, measured on the GPU that ran the engine and estimated for the others.

The estimate is a roofline model. A run takes at least max(FLOPs / peak FLOP/s, bytes / bandwidth)
on a GPU: compute-bound or bandwidth-bound, whichever is slower there. Another GPU's latency is the
measured one scaled by the ratio of the two GPUs' roofline times. The bytes are the least a run moves
(the weights and the inputs and outputs, once), so a run bound by activation traffic is estimated as
compute-bound; the estimate says which bound it used. A result is one item of the batch.
"""

from __future__ import annotations

import dataclasses

from kiln.targets.hardware import GPU


@dataclasses.dataclass(frozen=True)
class RunWork:
    """One run of an engine: its tensor-core FLOPs, the bytes it must move, and the results it gives."""

    flops: float
    bytes: float
    results: int  # items of the batch
    compute_format: str  # the format its matrix products run in: fp32, fp16, bf16, int8, fp8


def roofline_s(work: RunWork, gpu: GPU) -> tuple[float, str]:
    """The least time one run can take on gpu, and what bounds it ("compute" or "bandwidth")."""
    compute = work.flops / gpu.peak_flops(work.compute_format)
    bandwidth = work.bytes / (gpu.bandwidth_gb_s * 1e9)
    return (compute, "compute") if compute >= bandwidth else (bandwidth, "bandwidth")


def usd_per_1000(latency_ms: float, gpu: GPU, results: int) -> float:
    """What 1,000 results cost on gpu, at its on-demand price, when runs follow each other back to back."""
    return latency_ms / 1e3 * (1000 / results) * gpu.price.usd_per_hour / 3600


def roofline_fraction(work: RunWork, latency_ms: float, gpu: GPU) -> float:
    """Achieved FLOP/s over gpu's peak for the run's format."""
    return work.flops / (latency_ms / 1e3) / gpu.peak_flops(work.compute_format)


def cost_rows(work: RunWork, measured_ms: float, measured_on: GPU, others: list[GPU]) -> list[dict]:
    """The measured GPU's row, then an estimated row per other GPU (one that cannot run the format fast
    gets its reason instead)."""
    own_s, own_bound = roofline_s(work, measured_on)
    rows = [_row(measured_on, measured_ms, work, "measured", own_bound)]
    for gpu in others:
        if gpu.name == measured_on.name:
            continue
        if work.compute_format not in (*gpu.fast_precisions, "fp32"):
            rows.append({"target": gpu.name, "gpu": gpu.label, "basis": "none",
                         "reason": f"it has no fast {work.compute_format} (sm {gpu.sm})"})  # fmt: skip
            continue
        other_s, bound = roofline_s(work, gpu)
        rows.append(_row(gpu, measured_ms * other_s / own_s, work, "estimated", bound))
    return rows


def _row(gpu: GPU, ms: float, work: RunWork, basis: str, bound: str) -> dict:
    return {
        "target": gpu.name, "gpu": gpu.label, "basis": basis, "ms_per_run": ms, "bound": bound,
        "usd_per_hour": gpu.price.usd_per_hour, "usd_per_1000_results": usd_per_1000(ms, gpu, work.results),
        # An estimate scaled by the roofline has the measured fraction by construction: only measured rows get one.
        "roofline_fraction": roofline_fraction(work, ms, gpu) if basis == "measured" else None,
    }  # fmt: skip
