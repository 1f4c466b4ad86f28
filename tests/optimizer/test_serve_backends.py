"""What the GPU backend does to frames, run with torch on the CPU: the conversions to and from uint8
give the host backend's results exactly, so a frame does not depend on where it was computed. (The streams themselves are in test_serve_cuda.py, on a GPU.)"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.optimizer.serve.backends import HostBackend

torch = pytest.importorskip("torch")

from kiln.optimizer.serve.cuda import uint8_frame, unit_float  # noqa: E402


@pytest.mark.parametrize("channels_first, low", [(False, 0.0), (True, -1.0)])
def test_uint8_conversion_matches_the_host_backend(channels_first, low):
    rng = np.random.default_rng(1)
    shape = (3, 17, 23) if channels_first else (17, 23, 3)
    # Values around every rounding boundary, and outside the range (clipped).
    image = rng.uniform(low - 0.1, 1.1, shape).astype(np.float32)
    image.flat[:256] = (np.arange(256, dtype=np.float32) + 0.5) / 255 * (1 - low) + low
    want = HostBackend().to_frame(image, channels_first, low)
    got = uint8_frame(torch.from_numpy(image), channels_first, low)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (17, 23, 3)
    np.testing.assert_array_equal(got.numpy(), want)
    frame = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(unit_float(torch.from_numpy(frame)).numpy(), HostBackend().upload(frame))
