"""The GPU this machine has, asked of the CUDA driver itself (libcuda), so no framework is needed."""

from __future__ import annotations

import ctypes
import functools

FP8_CAPABILITY = (8, 9)  # Ada and newer: FP8 tensor cores
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
