"""Whether an engine built on one machine may load on this one.

A GPU engine records the machine it was built on (targets/gpu.py `fingerprint`). It loads only on a
GPU of the same compute capability, and an engine built for one GPU model (a per-GPU target such as
h200, or any TensorRT plan, which is compiled code for one GPU) only on that model. The runtime here
may be newer than the one that built the engine, never older: an older one may lack the ops or
formats it wrote; a TensorRT plan needs the very TensorRT version that built it.
"""

from __future__ import annotations

from collections.abc import Mapping


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".") if part.isdigit())


def differences(built: Mapping[str, str], here: Mapping[str, str], one_model: bool) -> list[str]:
    """What keeps an engine built with `built` (its manifest's built_with) from loading on a machine
    described by `here` (fingerprint() plus runtime versions); one_model: the engine is for one GPU
    model. Empty when it may load. An engine that recorded no GPU (a CPU engine) loads anywhere."""
    if "compute_capability" not in built:
        return []
    built_on = f"{built.get('gpu', 'a GPU')} (compute capability {built['compute_capability']})"
    if "compute_capability" not in here:
        return [f"it was built on {built_on}, and this machine has no CUDA GPU"]
    found = []
    if here["compute_capability"] != built["compute_capability"]:
        found.append(f"it was built on {built_on}, and this GPU is {here.get('gpu')} (compute capability {here['compute_capability']})")
    elif one_model and here.get("gpu") != built.get("gpu"):
        found.append(f"it was built for {built.get('gpu')}, and this GPU is {here.get('gpu')}")
    for library in ("onnxruntime", "tensorrt"):
        if library not in built:
            continue
        mine = here.get(library)
        if mine is None:
            found.append(f"it was built with {library} {built[library]}, which is not installed here")
        elif library == "tensorrt" and mine != built[library]:
            found.append(f"it is a TensorRT {built[library]} plan, and TensorRT here is {mine}")
        elif _version(mine) < _version(built[library]):
            found.append(f"it was built with {library} {built[library]}, and {library} here is the older {mine}")
    return found
