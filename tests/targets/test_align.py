"""targets.align: padding inputs to a model's alignment (centred, as the FILM authors' tools pad with
TensorFlow) and cropping outputs back, at full and pyramid resolutions, for numpy arrays and torch tensors."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.targets.align import Alignment, CropBox

tf = pytest.importorskip("tensorflow")

ALIGN = 64  # what kiln pads FILM to


def authors_padding(height: int, width: int, align: int = ALIGN) -> dict[str, int]:
    """The box FILM's own tools pad to with tf.image.pad_to_bounding_box (and crop back from)."""
    height_to_pad = (align - height % align) if height % align else 0
    width_to_pad = (align - width % align) if width % align else 0
    return {"offset_height": height_to_pad // 2, "offset_width": width_to_pad // 2,
            "target_height": height + height_to_pad, "target_width": width + width_to_pad}  # fmt: skip

FILM_LIKE = Alignment(ALIGN, {"x0": (1, 2), "x1": (1, 2)}, {"image": (1, 2), "half": (1, 2), "quarter": (1, 2)})


def _pool(array: np.ndarray, k: int) -> np.ndarray:
    b, h, w, c = array.shape
    return array.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


@pytest.mark.parametrize("height, width", [(51, 33), (77, 130), (64, 101), (1, 64), (127, 63)])
def test_pad_matches_the_film_authors_and_crops_back(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    feeds = {k: rng.standard_normal((2, height, width, 3)).astype(np.float32) for k in ("x0", "x1")}
    feeds["time"] = np.full((2, 1), 0.5, np.float32)
    padded, box = FILM_LIKE.pad(feeds)
    authors = authors_padding(height, width)
    assert box == CropBox(authors["offset_height"], authors["offset_width"], height, width, authors["target_height"])
    assert box.top == (ALIGN - height % ALIGN) % ALIGN // 2
    for name in ("x0", "x1"):
        want = tf.image.pad_to_bounding_box(tf.constant(feeds[name]), **authors).numpy()
        np.testing.assert_array_equal(padded[name], want)
    assert padded["time"] is feeds["time"]

    def identity_model(p):  # an output at full, 1/2 and 1/4 resolution, like FILM's pyramids
        return {"image": p["x0"], "half": _pool(p["x0"], 2), "quarter": _pool(p["x0"], 4), "time": p["time"]}

    out = FILM_LIKE.run_padded(identity_model, feeds)
    np.testing.assert_array_equal(out["image"], feeds["x0"])  # the round trip is exact
    assert out["time"] is feeds["time"]
    ph, pw = padded["x0"].shape[1:3]
    top, left = box.top, box.left
    for name, k in (("half", 2), ("quarter", 4)):
        level = identity_model(padded)[name]
        rows = slice(top // k, -(-(top + height) // k))
        cols = slice(left // k, -(-(left + width) // k))
        np.testing.assert_array_equal(out[name], level[:, rows, cols])
        # The crop is exactly the low-resolution pixels whose k×k block overlaps the original image.
        kept_rows = range(ph // k)[rows]
        assert all(r * k < top + height and (r + 1) * k > top for r in kept_rows)
        assert all(not (r * k < top + height and (r + 1) * k > top) for r in range(ph // k) if r not in kept_rows)
        kept_cols = range(pw // k)[cols]
        assert all(c * k < left + width and (c + 1) * k > left for c in kept_cols)
        assert all(not (c * k < left + width and (c + 1) * k > left) for c in range(pw // k) if c not in kept_cols)
        assert out[name].shape[1] >= -(-height // k) and out[name].shape[2] >= -(-width // k)


def test_aligned_sizes_are_not_padded_and_nchw_axes_work():
    feeds = {"x0": np.ones((1, 64, 128, 3), np.float32), "x1": np.ones((1, 64, 128, 3), np.float32)}
    padded, box = FILM_LIKE.pad(feeds)
    assert box is None and all(padded[k] is feeds[k] for k in feeds)
    assert FILM_LIKE.crop({"image": feeds["x0"]}, None)["image"] is feeds["x0"]

    nchw = Alignment(ALIGN, {"x0": (2, 3)}, {"image": (2, 3)})
    x0 = np.arange(2 * 3 * 50 * 70, dtype=np.float32).reshape(2, 3, 50, 70)
    padded, box = nchw.pad({"x0": x0})
    assert padded["x0"].shape == (2, 3, 64, 128) and box == CropBox(7, 29, 50, 70, 64)
    nhwc = tf.image.pad_to_bounding_box(tf.constant(x0.transpose(0, 2, 3, 1)), 7, 29, 64, 128).numpy()
    np.testing.assert_array_equal(padded["x0"], nhwc.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(nchw.run_padded(lambda p: {"image": p["x0"]}, {"x0": x0})["image"], x0)


def test_inputs_of_different_sizes_are_refused():
    feeds = {"x0": np.zeros((1, 50, 70, 3), np.float32), "x1": np.zeros((1, 50, 72, 3), np.float32)}
    with pytest.raises(ValueError, match=r"must share one height and width, got \[\(50, 70\), \(50, 72\)\]"):
        FILM_LIKE.pad(feeds)


def test_padding_and_cropping_torch_tensors_match_numpy():
    torch = pytest.importorskip("torch")
    film = Alignment(64, {"x0": (1, 2), "x1": (1, 2)}, {"image": (1, 2)})
    rng = np.random.default_rng(0)
    feeds = {k: rng.uniform(0, 1, (1, 50, 130, 3)).astype(np.float32) for k in ("x0", "x1")}
    feeds["time"] = np.full((1, 1), 0.5, np.float32)
    padded, box = film.pad(feeds)
    padded_t, box_t = film.pad({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert box_t == box == CropBox(7, 31, 50, 130, 64)
    for name in feeds:
        np.testing.assert_array_equal(padded_t[name].numpy(), padded[name])
    cropped = film.crop({"image": padded_t["x0"]}, box)["image"]
    np.testing.assert_array_equal(cropped.numpy(), feeds["x0"])
