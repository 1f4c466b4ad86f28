"""The GPU this machine has, asked of the CUDA driver itself (libcuda), so no framework is needed."""

from __future__ import annotations

import ctypes
import functools

_MAJOR, _MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


@functools.cache
def compute_capability(device: int = 0) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device, or None without a driver or a device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), device):
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), _MAJOR, dev) or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _MINOR, dev):
        return None
    return major.value, minor.value


@functools.cache
def device_name(device: int = 0) -> str | None:
    """The CUDA device's name ("NVIDIA H200"), or None without a driver or a device."""
    if compute_capability(device) is None:
        return None
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, name = ctypes.c_int(), ctypes.create_string_buffer(256)
    if cuda.cuDeviceGet(ctypes.byref(dev), device) or cuda.cuDeviceGetName(name, len(name), dev):
        return None
    return name.value.decode(errors="replace")


def _loaded(sonames: tuple[str, ...]):
    """The first of these libraries that this process has already loaded (what actually runs), or None."""
    import os

    for soname in sonames:
        try:
            return ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def _driver_release() -> str | None:
    """The NVIDIA driver's release ("580.159.04"), from NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    text = ctypes.create_string_buffer(96)
    if nvml.nvmlInit_v2() or nvml.nvmlSystemGetDriverVersion(text, len(text)):
        return None
    return text.value.decode(errors="replace")


def _int_version(library, symbol: str) -> int | None:
    value = ctypes.c_int()
    if library is None or getattr(library, symbol)(ctypes.byref(value)):
        return None
    return value.value


def fingerprint(device: int = 0) -> dict[str, str]:
    """What makes a GPU engine built here specific to here: the GPU, its compute capability, the
    driver, and the CUDA driver, CUDA runtime and cuDNN versions loaded in this process. Empty
    without a GPU; libraries not (yet) loaded are left out."""
    capability = compute_capability(device)
    if capability is None:
        return {}
    found = {"gpu": device_name(device) or "unknown", "compute_capability": f"{capability[0]}.{capability[1]}"}
    release = _driver_release()
    if release:
        found["driver"] = release
    cuda_driver = _int_version(ctypes.CDLL("libcuda.so.1"), "cuDriverGetVersion")
    if cuda_driver:
        found["cuda_driver"] = f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}"
    runtime = _int_version(_loaded(("libcudart.so.13", "libcudart.so.12")), "cudaRuntimeGetVersion")
    if runtime:
        found["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
    cudnn = _loaded(("libcudnn.so.9", "libcudnn.so.8"))
    if cudnn is not None:
        cudnn.cudnnGetVersion.restype = ctypes.c_size_t
        v = cudnn.cudnnGetVersion()
        found["cudnn"] = f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"
    return found
