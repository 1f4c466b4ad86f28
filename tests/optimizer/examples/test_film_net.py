"""kiln.optimizer.examples.film_net: the reference FILM (film_net) architecture in TensorFlow, its warp and its SavedModel."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from kiln.optimizer.examples import film_net as F  # noqa: E402

GATHER_TYPES = ("GatherV2", "ResourceGather", "Gather")
SMALL = F.FilmConfig.small()


@pytest.fixture(scope="module")
def small_model():
    return F.FilmNet(SMALL, seed=0)


def frames(batch, height, width, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.random((batch, height, width, 3), dtype=np.float32)
    x1 = np.roll(x0, shift=(1, 3), axis=(1, 2))
    time = np.full((batch, 1), 0.5, np.float32)
    return x0, x1, time


# ------------------------------------------------------------------------------------------------ config


def test_configs_validate_and_align():
    assert F.FilmConfig().validate().alignment == 64
    assert SMALL.validate().alignment == 16
    assert SMALL.num_warps == 16
    assert F.FilmConfig().num_warps == 2 * 6 + 2 * 5


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"fusion_pyramid_levels": 8}, "fusion_pyramid_levels"),
        ({"fusion_pyramid_levels": 0}, "fusion_pyramid_levels"),
        ({"specialized_levels": 8, "flow_convs": (3,) * 9, "flow_filters": (32,) * 9}, "specialized_levels"),
        ({"flow_convs": (3, 3, 3)}, "flow_convs"),
        ({"flow_filters": (32, 64, 128, 256, 512)}, "flow_filters"),
        ({"flow_filters": (32, 64, 1, 256)}, "flow_filters"),
        ({"pyramid_levels": 0}, "pyramid_levels"),
        ({"sub_levels": 0}, "sub_levels"),
        ({"filters": 0}, "filters"),
        ({"filters": 8.0}, "filters"),
        # The shared estimator would see features of different widths at levels 1 and 2.
        ({"specialized_levels": 1, "flow_convs": (3, 3), "flow_filters": (32, 64)}, "sub_levels"),
    ],
)
def test_invalid_configs_raise(changes, words):
    config = F.FilmConfig(**changes)
    with pytest.raises(ValueError, match=words):
        config.validate()
    with pytest.raises(ValueError):
        F.FilmNet(config)


# ------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("height, width", [(32, 48), (48, 16)])
def test_output_shapes(small_model, batch, height, width):
    assert height % SMALL.alignment == 0 and width % SMALL.alignment == 0
    out = small_model(*frames(batch, height, width))
    assert list(out) == F.output_names(SMALL)
    for key in ("image", "x0_warped", "x1_warped"):
        assert out[key].shape == (batch, height, width, 3)
    for prefix, levels in [
        ("forward_residual_flow_pyramid", SMALL.pyramid_levels),
        ("backward_residual_flow_pyramid", SMALL.pyramid_levels),
        ("forward_flow_pyramid", SMALL.fusion_pyramid_levels),
        ("backward_flow_pyramid", SMALL.fusion_pyramid_levels),
    ]:
        for i in range(levels):
            assert out[f"{prefix}_{i}"].shape == (batch, height >> i, width >> i, 2)
    for value in out.values():
        assert np.all(np.isfinite(value.numpy()))
    # Random weights still give a usable graph: bounded output, flows of a few pixels, not all zero.
    assert 0.01 < float(tf.reduce_max(tf.abs(out["forward_flow_pyramid_0"]))) < 50


def test_graph_has_four_gathers_per_warp(small_model):
    graph = tf.function(small_model).get_concrete_function(*F.input_signature()).graph
    types = [op.type for op in graph.get_operations()]
    assert sum(t in GATHER_TYPES for t in types) == 4 * 16 == 4 * SMALL.num_warps


def test_same_seed_same_weights_other_seed_differs(small_model):
    again = F.FilmNet(SMALL, seed=0).weights()
    other = F.FilmNet(SMALL, seed=1).weights()
    ours = small_model.weights()
    assert list(ours) == list(again) == list(other)
    assert all(np.array_equal(ours[k], again[k]) for k in ours)
    assert not any(np.array_equal(ours[k], other[k]) for k in ours)
    # Biases are random too (so tests exercise them), small next to the weights.
    biases = [v for k, v in ours.items() if "bias" in k]
    assert biases and all(np.any(b != 0) and np.abs(b).max() <= 0.05 for b in biases)


# -------------------------------------------------------------------------------------------------- warp


def numpy_warp(image, flow):
    """out[b, y, x] = bilinear(image[b], y - flow[b, y, x, 0], x - flow[b, y, x, 1]), clamped to the border."""
    batch, height, width, _ = image.shape
    out = np.zeros_like(image, dtype=np.float64)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                qy = min(max(y - float(flow[b, y, x, 0]), 0.0), height - 1.0)
                qx = min(max(x - float(flow[b, y, x, 1]), 0.0), width - 1.0)
                y0, x0 = int(np.floor(qy)), int(np.floor(qx))
                y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
                ay, ax = qy - y0, qx - x0
                top = (1 - ax) * image[b, y0, x0] + ax * image[b, y0, x1]
                bottom = (1 - ax) * image[b, y1, x0] + ax * image[b, y1, x1]
                out[b, y, x] = (1 - ay) * top + ay * bottom
    return out.astype(np.float32)


def warp_image(batch=2, height=6, width=7, channels=3, seed=0):
    return np.random.default_rng(seed).random((batch, height, width, channels), dtype=np.float32)


def test_dense_image_warp_integer_flow_shifts_pixels():
    image = warp_image()
    flow = np.zeros(image.shape[:3] + (2,), np.float32)
    flow[0, ..., 0], flow[0, ..., 1] = 1.0, 2.0  # batch 0 reads from (y - 1, x - 2)
    flow[1, ..., 0], flow[1, ..., 1] = -2.0, 0.0  # batch 1 reads from (y + 2, x)
    out = F.dense_image_warp(image, flow).numpy()
    np.testing.assert_array_equal(out[0, 1:, 2:], image[0, :-1, :-2])
    np.testing.assert_array_equal(out[1, :-2], image[1, 2:])
    np.testing.assert_allclose(out, numpy_warp(image, flow), atol=1e-6)


def test_dense_image_warp_fractional_flow_is_bilinear():
    image = warp_image(seed=1)
    flow = np.random.default_rng(2).uniform(-1.5, 1.5, image.shape[:3] + (2,)).astype(np.float32)
    np.testing.assert_allclose(F.dense_image_warp(image, flow).numpy(), numpy_warp(image, flow), atol=1e-6)
    # A half-pixel shift in x averages neighbouring columns.
    half = np.zeros_like(flow)
    half[..., 1] = -0.5
    out = F.dense_image_warp(image, half).numpy()
    np.testing.assert_allclose(out[:, :, :-1], 0.5 * (image[:, :, :-1] + image[:, :, 1:]), atol=1e-6)


def test_dense_image_warp_outside_takes_border_value():
    image = warp_image(seed=3)
    batch, height, width, _ = image.shape
    flow = np.zeros((batch, height, width, 2), np.float32)
    flow[0, ..., 1] = 100.0  # far to the left: column 0
    flow[1, ..., 0] = -100.5  # far below: last row
    out = F.dense_image_warp(image, flow).numpy()
    np.testing.assert_array_equal(out[0], np.repeat(image[0, :, :1], width, axis=1))
    np.testing.assert_array_equal(out[1], np.repeat(image[1, -1:], height, axis=0))
    mixed = np.random.default_rng(4).uniform(-20, 20, flow.shape).astype(np.float32)
    np.testing.assert_allclose(F.dense_image_warp(image, mixed).numpy(), numpy_warp(image, mixed), atol=1e-6)


def test_film_warp_uses_xy_flow_pointing_to_source():
    image = warp_image()
    flow = np.zeros(image.shape[:3] + (2,), np.float32)
    flow[..., 0], flow[..., 1] = 2.0, 1.0  # FILM order (dx, dy): out[y, x] = image[y + 1, x + 2]
    out = F.warp(image, flow).numpy()
    np.testing.assert_array_equal(out[:, :-1, :-2], image[:, 1:, 2:])


# -------------------------------------------------------------------------------------------- SavedModel


def test_saved_model_round_trip(tmp_path, small_model):
    destination = tmp_path / "film"
    destination.mkdir()
    (destination / "stale.txt").write_text("replaced by the export")
    assert F.export_saved_model(destination, SMALL, seed=0) == destination
    assert not (destination / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["film"]  # no staging directory left behind

    loaded = F.load_saved_model(destination)
    serving = loaded.signatures["serving_default"]
    _, kwargs = serving.structured_input_signature
    assert sorted(kwargs) == ["time", "x0", "x1"]
    assert kwargs["x0"].shape.as_list() == [None, None, None, 3]
    assert kwargs["time"].shape.as_list() == [None, 1]
    assert sorted(serving.structured_outputs) == sorted(F.output_names(SMALL))

    x0, x1, time = frames(2, 32, 48, seed=5)
    got = F.reference_interpolate(destination, x0, x1, time, model=loaded)
    want = small_model(x0, x1, time)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value.numpy(), rtol=1e-6, atol=1e-6, err_msg=key)
