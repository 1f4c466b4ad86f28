"""kiln's in-graph rotary grid for HunyuanDiT against its pipeline's rule computed with Python numbers
(get_resize_crop_region_for_grid: its module imports transformers, which kiln does not need), at every
grid from 1 to 40 patches a side (wide, tall, square; sizes whose resize rounds at .5)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers.models.embeddings import get_2d_rotary_pos_embed  # noqa: E402

from kiln.optimizer.importers.cropped_rope import crop_region, cropped_rotary  # noqa: E402

BASE = 32  # 512 pixels / 8 / patch 2, as HunyuanDiT's pipeline


def get_resize_crop_region_for_grid(src, size):
    """The pipeline's rule: fit the grid in a size x size square (Python round), centred."""
    h, w = src
    height, width = (size, round(size / h * w)) if h / w > 1 else (round(size / w * h), size)
    top, left = round((size - height) / 2.0), round((size - width) / 2.0)
    return (top, left), (top + height, left + width)


def test_crop_region_is_the_pipelines():
    for rows in range(1, 41):
        for cols in range(1, 41):
            (top, left), (bottom, right) = crop_region(torch, rows, cols, BASE, BASE)
            got = ((int(top), int(left)), (int(bottom), int(right)))
            assert got == get_resize_crop_region_for_grid((rows, cols), BASE), (rows, cols)


@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 5), (5, 7), (16, 16), (12, 40), (33, 9)])
def test_rotary_grid_is_the_pipelines(rows, cols):
    want = get_2d_rotary_pos_embed(16, get_resize_crop_region_for_grid((rows, cols), BASE), (rows, cols))
    got = cropped_rotary(16, rows, cols, BASE)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
