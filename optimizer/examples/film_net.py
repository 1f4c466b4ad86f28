"""FILM's `film_net` (Reda et al., "FILM: Frame Interpolation for Large Motion", ECCV 2022) in TensorFlow 2.

A reference architecture for kiln's TensorFlow importer and its FILM rewrites: the same graph a released
FILM SavedModel holds (shared-weight feature pyramid, residual pyramid flow estimation, backward warping
through dense_image_warp, U-Net fusion), with seeded random weights instead of trained ones, so tests and
benchmarks can build it at any size without downloading anything.

This module imports TensorFlow at import time; nothing else in kiln imports it at module import time.
The warp reproduces the op structure of `tensorflow_addons.image.dense_image_warp` (four Gathers per warp,
clamped bilinear lookup), because that is what real FILM SavedModels contain and what kiln's warp rewrite
must recognize.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from kiln.optimizer.outdir import staged_dir

LEAKY_ALPHA = 0.2
# Gain that keeps activations O(1) through a leaky ReLU with LEAKY_ALPHA (He et al., 2015).
_LEAKY_GAIN = float(np.sqrt(2.0 / (1.0 + LEAKY_ALPHA**2)))
_BIAS_SCALE = 0.05

INPUT_NAMES = ("x0", "x1", "time")
PYRAMID_OUTPUTS = (
    "forward_residual_flow_pyramid",
    "backward_residual_flow_pyramid",
    "forward_flow_pyramid",
    "backward_flow_pyramid",
)


@dataclasses.dataclass(frozen=True)
class FilmConfig:
    """film_net hyperparameters; the defaults are the released "Style"/"L1" model's."""

    pyramid_levels: int = 7
    fusion_pyramid_levels: int = 5
    specialized_levels: int = 3
    sub_levels: int = 4
    filters: int = 64
    flow_convs: tuple[int, ...] = (3, 3, 3, 3)
    flow_filters: tuple[int, ...] = (32, 64, 128, 256)

    @classmethod
    def small(cls) -> FilmConfig:
        """A tiny configuration for tests: 8 flow-estimator warps + 8 fusion warps = 16 warps."""
        return cls(
            pyramid_levels=5,
            fusion_pyramid_levels=4,
            specialized_levels=2,
            sub_levels=3,
            filters=8,
            flow_convs=(2, 2, 2),
            flow_filters=(8, 16, 32),
        )

    @property
    def alignment(self) -> int:
        """Input height and width must be multiples of this (each pyramid level halves them exactly)."""
        return 2 ** (self.pyramid_levels - 1)

    @property
    def num_warps(self) -> int:
        """Warps in the graph: (levels - 1) per flow direction in estimation, plus two per fusion level."""
        return 2 * (self.pyramid_levels - 1) + 2 * self.fusion_pyramid_levels

    def validate(self) -> FilmConfig:
        """Raise ValueError if the hyperparameters do not describe a buildable film_net; return self."""
        for name in ("pyramid_levels", "fusion_pyramid_levels", "specialized_levels", "sub_levels", "filters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"FilmConfig.{name} must be an int, got {value!r}")
        if self.pyramid_levels < 1:
            raise ValueError(f"FilmConfig.pyramid_levels must be >= 1, got {self.pyramid_levels}")
        if not 1 <= self.fusion_pyramid_levels <= self.pyramid_levels:
            raise ValueError(
                f"FilmConfig.fusion_pyramid_levels must be in 1..pyramid_levels ({self.pyramid_levels}), "
                f"got {self.fusion_pyramid_levels}"
            )
        if not 1 <= self.specialized_levels <= self.pyramid_levels:
            raise ValueError(
                f"FilmConfig.specialized_levels must be in 1..pyramid_levels ({self.pyramid_levels}), "
                f"got {self.specialized_levels}"
            )
        if self.sub_levels < 1:
            raise ValueError(f"FilmConfig.sub_levels must be >= 1, got {self.sub_levels}")
        if self.filters < 1:
            raise ValueError(f"FilmConfig.filters must be >= 1, got {self.filters}")
        want = self.specialized_levels + 1
        for name in ("flow_convs", "flow_filters"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)) or len(values) != want:
                raise ValueError(
                    f"FilmConfig.{name} must have specialized_levels + 1 = {want} entries "
                    f"(one per specialized level, then the shared coarse estimator), got {values!r}"
                )
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"FilmConfig.{name} must hold ints, got {values!r}")
        if any(v < 0 for v in self.flow_convs):
            raise ValueError(f"FilmConfig.flow_convs must be >= 0, got {self.flow_convs!r}")
        if any(v < 2 for v in self.flow_filters):
            raise ValueError(f"FilmConfig.flow_filters must be >= 2 (a 1x1 conv uses half), got {self.flow_filters!r}")
        if self.pyramid_levels - self.specialized_levels > 1 and self.specialized_levels < self.sub_levels - 1:
            # The shared estimator serves levels specialized_levels.. ; their cascaded features have the same
            # width only where the cascade is full (level >= sub_levels - 1).
            raise ValueError(
                f"FilmConfig.specialized_levels ({self.specialized_levels}) must be >= sub_levels - 1 "
                f"({self.sub_levels - 1}) when the shared flow estimator serves more than one level: the "
                "cascaded features of those levels would have different channel counts"
            )
        return self


# --------------------------------------------------------------------------------------------- layers


class _Conv(tf.Module):
    """A 2-D convolution (NHWC, padding SAME) with bias and an optional leaky ReLU."""

    def __init__(self, rng, kernel, in_ch, out_ch, *, activation, gain=None, name=None):
        super().__init__(name=name)
        fan_in = kernel * kernel * in_ch
        if gain is None:
            gain = _LEAKY_GAIN if activation else 1.0
        w = rng.normal(0.0, gain / np.sqrt(fan_in), size=(kernel, kernel, in_ch, out_ch)).astype(np.float32)
        b = rng.uniform(-_BIAS_SCALE, _BIAS_SCALE, size=(out_ch,)).astype(np.float32)
        self.kernel = tf.Variable(w, name="kernel")
        self.bias = tf.Variable(b, name="bias")
        self.activation = activation

    def __call__(self, x):
        y = tf.nn.bias_add(tf.nn.conv2d(x, self.kernel, strides=1, padding="SAME"), self.bias)
        return tf.nn.leaky_relu(y, alpha=LEAKY_ALPHA) if self.activation else y


def _avg_pool(x):
    return tf.nn.avg_pool2d(x, ksize=2, strides=2, padding="VALID")


class _SubTreeExtractor(tf.Module):
    """`sub_levels` stages of two 3x3 convs (filters << i channels), 2x2 average pooling between stages."""

    def __init__(self, rng, config: FilmConfig, name="feature_extractor"):
        super().__init__(name=name)
        self.convs = []
        in_ch = 3
        for i in range(config.sub_levels):
            ch = config.filters << i
            self.convs.append(_Conv(rng, 3, in_ch, ch, activation=True, name=f"cfeat_conv_{2 * i}"))
            self.convs.append(_Conv(rng, 3, ch, ch, activation=True, name=f"cfeat_conv_{2 * i + 1}"))
            in_ch = ch

    def __call__(self, image, depth):
        head = image
        outputs = []
        for i in range(depth):
            head = self.convs[2 * i + 1](self.convs[2 * i](head))
            outputs.append(head)
            if i < depth - 1:
                head = _avg_pool(head)
        return outputs


class _FlowEstimator(tf.Module):
    """concat(a, b) -> n 3x3 convs -> 1x1 conv (half the filters) -> 1x1 conv to a 2-channel flow."""

    def __init__(self, rng, in_ch, num_convs, num_filters, name):
        super().__init__(name=name)
        self.convs = []
        ch = in_ch
        for i in range(num_convs):
            self.convs.append(_Conv(rng, 3, ch, num_filters, activation=True, name=f"flow_conv_{i}"))
            ch = num_filters
        self.convs.append(_Conv(rng, 1, ch, num_filters // 2, activation=True, name=f"flow_conv_{num_convs}"))
        # With these weights the finest flows come out a few pixels (small config, 32x48) to ~20 pixels
        # (default config, 128x128): enough to exercise the warp's interpolation and border clamping.
        self.convs.append(_Conv(rng, 1, num_filters // 2, 2, activation=False, name=f"flow_conv_{num_convs + 1}"))

    def __call__(self, features_a, features_b):
        net = tf.concat([features_a, features_b], axis=-1)
        for conv in self.convs:
            net = conv(net)
        return net


class _Fusion(tf.Module):
    """The U-Net decoder that turns the aligned pyramid into the output image."""

    def __init__(self, rng, config: FilmConfig, aligned_channels, name="fusion"):
        super().__init__(name=name)
        self.levels = config.fusion_pyramid_levels
        m = config.specialized_levels
        self.convs = [None] * (self.levels - 1)
        net_ch = aligned_channels[-1]
        for i in reversed(range(self.levels - 1)):
            n = (config.filters << i) if i < m else (config.filters << m)
            self.convs[i] = [
                _Conv(rng, 2, net_ch, n, activation=False, name=f"fusion_level_{i}_up"),
                _Conv(rng, 3, aligned_channels[i] + n, n, activation=True, name=f"fusion_level_{i}_conv_0"),
                _Conv(rng, 3, n, n, activation=True, name=f"fusion_level_{i}_conv_1"),
            ]
            net_ch = n
        self.output_conv = _Conv(rng, 1, net_ch, 3, activation=False, name="fusion_output")

    def __call__(self, pyramid):
        net = pyramid[-1]
        for i in reversed(range(self.levels - 1)):
            level_size = tf.shape(pyramid[i])[1:3]
            net = tf.image.resize(net, level_size, method=tf.image.ResizeMethod.NEAREST_NEIGHBOR)
            up, conv0, conv1 = self.convs[i]
            net = up(net)
            net = tf.concat([pyramid[i], net], axis=-1)
            net = conv1(conv0(net))
        return self.output_conv(net)


# ----------------------------------------------------------------------------------------------- warp


def _dim(x, index):
    """A dimension of x: the static value when known, else read from tf.shape at run time."""
    static = x.shape[index]
    return static if static is not None else tf.shape(x)[index]


def interpolate_bilinear(grid, query_points):
    """Clamped bilinear lookup of grid [B, H, W, C] at query_points [B, N, 2] given as (y, x).

    Per axis the lower corner is clipped to [0, size - 2] and the weight to [0, 1], so points outside the
    image take the border value. Each corner is one Gather on the flattened grid.
    """
    with tf.name_scope("interpolate_bilinear"):
        grid = tf.convert_to_tensor(grid)
        query_points = tf.convert_to_tensor(query_points)
        grid_shape = tf.shape(grid)
        query_shape = tf.shape(query_points)
        batch_size, height, width, channels = grid_shape[0], grid_shape[1], grid_shape[2], grid_shape[3]
        num_queries = query_shape[1]
        alphas, floors, ceils = [], [], []
        queries_by_axis = tf.unstack(query_points, num=2, axis=2)
        for axis in (0, 1):
            with tf.name_scope(f"dim-{axis}"):
                queries = queries_by_axis[axis]
                max_floor = tf.cast(grid_shape[axis + 1] - 2, query_points.dtype)
                min_floor = tf.constant(0.0, dtype=query_points.dtype)
                floor = tf.math.minimum(tf.math.maximum(min_floor, tf.math.floor(queries)), max_floor)
                int_floor = tf.cast(floor, tf.int32)
                floors.append(int_floor)
                ceils.append(int_floor + 1)
                alpha = tf.cast(queries - floor, grid.dtype)
                alpha = tf.math.minimum(
                    tf.math.maximum(tf.constant(0.0, dtype=grid.dtype), alpha), tf.constant(1.0, dtype=grid.dtype)
                )
                alphas.append(tf.expand_dims(alpha, 2))

        flattened_grid = tf.reshape(grid, [batch_size * height * width, channels])
        batch_offsets = tf.reshape(tf.range(batch_size) * height * width, [batch_size, 1])

        def corner(y, x, name):
            with tf.name_scope(f"gather-{name}"):
                linear = batch_offsets + y * width + x
                return tf.reshape(tf.gather(flattened_grid, linear), [batch_size, num_queries, channels])

        top_left = corner(floors[0], floors[1], "top_left")
        top_right = corner(floors[0], ceils[1], "top_right")
        bottom_left = corner(ceils[0], floors[1], "bottom_left")
        bottom_right = corner(ceils[0], ceils[1], "bottom_right")
        with tf.name_scope("interpolate"):
            interp_top = alphas[1] * (top_right - top_left) + top_left
            interp_bottom = alphas[1] * (bottom_right - bottom_left) + bottom_left
            return alphas[0] * (interp_bottom - interp_top) + interp_top


def dense_image_warp(image, flow, name=None):
    """output[b, y, x] = bilinear(image[b], y - flow[b, y, x, 0], x - flow[b, y, x, 1]), border-clamped.

    Same semantics and op structure as tensorflow_addons.image.dense_image_warp: flow is [B, H, W, 2] in
    (dy, dx) order and points from the output to the source with a minus sign.
    """
    with tf.name_scope(name or "dense_image_warp"):
        image = tf.convert_to_tensor(image)
        flow = tf.convert_to_tensor(flow)
        batch_size, height, width, channels = (_dim(image, i) for i in range(4))
        grid_x, grid_y = tf.meshgrid(tf.range(width), tf.range(height))
        stacked_grid = tf.cast(tf.stack([grid_y, grid_x], axis=2), flow.dtype)
        batched_grid = tf.expand_dims(stacked_grid, axis=0)
        query_points_on_grid = batched_grid - flow
        query_points_flattened = tf.reshape(query_points_on_grid, [batch_size, height * width, 2])
        interpolated = interpolate_bilinear(image, query_points_flattened)
        return tf.reshape(interpolated, [batch_size, height, width, channels])


def warp(image, flow):
    """FILM's backward warp: output[b, y, x] = bilinear(image[b], y + flow[..., 1], x + flow[..., 0]).

    FILM's flows are (dx, dy) and point from the output to the source, so they are reversed and negated
    for dense_image_warp.
    """
    warped = dense_image_warp(image, -flow[..., ::-1])
    return tf.reshape(warped, shape=tf.shape(image))


# -------------------------------------------------------------------------------------------- pyramids


def _image_pyramid(image, levels):
    pyramid = []
    for i in range(levels):
        pyramid.append(image)
        if i < levels - 1:
            image = _avg_pool(image)
    return pyramid


def flow_pyramid_synthesis(residual_pyramid):
    """Accumulate a finest-first residual flow pyramid into flows, coarse to fine; return finest-first."""
    flow = residual_pyramid[-1]
    flows = [flow]
    for residual in reversed(residual_pyramid[:-1]):
        level_size = tf.shape(residual)[1:3]
        flow = tf.image.resize(2 * flow, level_size)
        flow = residual + flow
        flows.append(flow)
    return list(reversed(flows))


def _multiply_pyramid(pyramid, scalars):
    """Scale each batch element of every level by scalars[b] (as FILM does: through a transpose to CHWB)."""
    return [tf.transpose(tf.transpose(level, [3, 1, 2, 0]) * scalars, [3, 1, 2, 0]) for level in pyramid]


def _concat_pyramids(a, b):
    return [tf.concat([x, y], axis=-1) for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------------ model


class FilmNet(tf.Module):
    """film_net with deterministic random weights: FilmNet(config, seed)(x0, x1, time) -> dict of tensors.

    x0, x1: float32 [B, H, W, 3] with H, W multiples of config.alignment; time: float32 [B, 1] (only its
    batch size is used: film_net always predicts t = 0.5).
    """

    def __init__(self, config: FilmConfig | None = None, seed: int = 0, name: str = "film_net"):
        super().__init__(name=name)
        self.config = (config or FilmConfig()).validate()
        self.seed = int(seed)
        cfg = self.config
        rng = np.random.default_rng(self.seed)

        self.extractor = _SubTreeExtractor(rng, cfg)
        # Channels of the cascaded feature at each pyramid level.
        stage_ch = [cfg.filters << i for i in range(cfg.sub_levels)]
        self.feature_channels = [sum(stage_ch[: min(j, cfg.sub_levels - 1) + 1]) for j in range(cfg.pyramid_levels)]

        self.predictors = []
        for i in range(cfg.specialized_levels):
            in_ch = 2 * self.feature_channels[i]
            self.predictors.append(
                _FlowEstimator(rng, in_ch, cfg.flow_convs[i], cfg.flow_filters[i], name=f"flow_predictor_{i}")
            )
        if cfg.pyramid_levels > cfg.specialized_levels:
            # Levels from specialized_levels on have the same feature width (validate() checks), so one
            # estimator serves them all.
            in_ch = 2 * self.feature_channels[cfg.specialized_levels]
            shared = _FlowEstimator(rng, in_ch, cfg.flow_convs[-1], cfg.flow_filters[-1], name="flow_predictor_shared")
            self.predictors.extend([shared] * (cfg.pyramid_levels - cfg.specialized_levels))

        aligned_ch = [2 * (3 + self.feature_channels[i]) + 4 for i in range(cfg.fusion_pyramid_levels)]
        self.fusion = _Fusion(rng, cfg, aligned_ch)

    def _features(self, image_pyramid):
        cfg = self.config
        levels = len(image_pyramid)
        sub = [self.extractor(image_pyramid[j], min(cfg.sub_levels, cfg.pyramid_levels - j)) for j in range(levels)]
        features = []
        for j in range(levels):
            parts = [sub[j][0]] + [sub[j - k][k] for k in range(1, cfg.sub_levels) if k <= j]
            features.append(tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0])
        return features

    def _estimate_flow(self, features_a, features_b):
        levels = len(features_a)
        v = self.predictors[-1](features_a[-1], features_b[-1])
        residuals = [v]
        for i in reversed(range(levels - 1)):
            level_size = tf.shape(features_a[i])[1:3]
            v = tf.image.resize(2 * v, level_size)
            warped = warp(features_b[i], v)
            residual = self.predictors[i](features_a[i], warped)
            residuals.append(residual)
            v = residual + v
        return list(reversed(residuals))

    def __call__(self, x0, x1, time):
        cfg = self.config
        fusion_levels = cfg.fusion_pyramid_levels
        image_pyramids = [_image_pyramid(x0, cfg.pyramid_levels), _image_pyramid(x1, cfg.pyramid_levels)]
        feature_pyramids = [self._features(image_pyramids[0]), self._features(image_pyramids[1])]

        forward_residual = self._estimate_flow(feature_pyramids[0], feature_pyramids[1])
        backward_residual = self._estimate_flow(feature_pyramids[1], feature_pyramids[0])
        forward_flow_pyramid = flow_pyramid_synthesis(forward_residual)[:fusion_levels]
        backward_flow_pyramid = flow_pyramid_synthesis(backward_residual)[:fusion_levels]

        mid_time = tf.ones_like(time) * 0.5
        backward_flow = _multiply_pyramid(backward_flow_pyramid, mid_time[:, 0])
        forward_flow = _multiply_pyramid(forward_flow_pyramid, 1 - mid_time[:, 0])

        to_warp_0 = _concat_pyramids(image_pyramids[0][:fusion_levels], feature_pyramids[0][:fusion_levels])
        to_warp_1 = _concat_pyramids(image_pyramids[1][:fusion_levels], feature_pyramids[1][:fusion_levels])
        forward_warped = [warp(img, flow) for img, flow in zip(to_warp_0, backward_flow)]
        backward_warped = [warp(img, flow) for img, flow in zip(to_warp_1, forward_flow)]

        aligned = _concat_pyramids(forward_warped, backward_warped)
        aligned = _concat_pyramids(aligned, backward_flow)
        aligned = _concat_pyramids(aligned, forward_flow)
        prediction = self.fusion(aligned)

        outputs = {
            "image": prediction[..., :3],
            "x0_warped": forward_warped[0][..., 0:3],
            "x1_warped": backward_warped[0][..., 0:3],
        }
        pyramids = {
            "forward_residual_flow_pyramid": forward_residual,
            "backward_residual_flow_pyramid": backward_residual,
            "forward_flow_pyramid": forward_flow_pyramid,
            "backward_flow_pyramid": backward_flow_pyramid,
        }
        for key, pyramid in pyramids.items():
            for i, level in enumerate(pyramid):
                outputs[f"{key}_{i}"] = level
        return outputs

    def weights(self) -> dict[str, np.ndarray]:
        """Every variable by its unique path name (shared estimators appear once), as numpy arrays."""
        return {v.name: v.numpy() for v in self.variables}


def output_names(config: FilmConfig) -> list[str]:
    """The keys FilmNet returns (and the SavedModel signature's outputs), in order."""
    names = ["image", "x0_warped", "x1_warped"]
    for key in PYRAMID_OUTPUTS:
        synthesized = key in ("forward_flow_pyramid", "backward_flow_pyramid")
        levels = config.fusion_pyramid_levels if synthesized else config.pyramid_levels
        names += [f"{key}_{i}" for i in range(levels)]
    return names


def input_signature():
    """The serving signature's inputs: x0, x1 float32 [None, None, None, 3], time float32 [None, 1]."""
    return [
        tf.TensorSpec([None, None, None, 3], tf.float32, name="x0"),
        tf.TensorSpec([None, None, None, 3], tf.float32, name="x1"),
        tf.TensorSpec([None, 1], tf.float32, name="time"),
    ]


# ------------------------------------------------------------------------------------ SavedModel helpers


def export_saved_model(directory, config: FilmConfig | None = None, seed: int = 0) -> Path:
    """Write FilmNet(config, seed) as a SavedModel with a `serving_default` signature; return its path.

    The signature takes x0, x1 (float32 [None, None, None, 3]) and time (float32 [None, 1]) and returns the
    dict FilmNet returns. The SavedModel is built beside `directory` and renamed into place, replacing it.
    """
    directory = Path(directory)
    model = FilmNet(config, seed)

    @tf.function(input_signature=input_signature())
    def serve(x0, x1, time):
        return model(x0, x1, time)

    model.serve = serve
    with staged_dir(directory) as stage:
        tf.saved_model.save(model, os.fspath(stage), signatures={"serving_default": serve.get_concrete_function()})
    return directory


def load_saved_model(saved_model_dir):
    """tf.saved_model.load, as a path-friendly helper."""
    return tf.saved_model.load(os.fspath(saved_model_dir))


def reference_interpolate(saved_model_dir, x0, x1, time=None, *, model=None) -> dict[str, np.ndarray]:
    """Run a SavedModel's serving_default on numpy inputs; return its outputs as numpy arrays.

    x0, x1: [B, H, W, 3] float32 arrays; time: [B, 1] (defaults to 0.5 for each batch element). Pass
    model (a tf.saved_model.load result) to skip loading it again.
    """
    x0 = np.asarray(x0, np.float32)
    x1 = np.asarray(x1, np.float32)
    if time is None:
        time = np.full((x0.shape[0], 1), 0.5, np.float32)
    time = np.asarray(time, np.float32).reshape(x0.shape[0], 1)
    loaded = model if model is not None else load_saved_model(saved_model_dir)
    fn = loaded.signatures["serving_default"]
    out = fn(x0=tf.constant(x0), x1=tf.constant(x1), time=tf.constant(time))
    return {k: v.numpy() for k, v in out.items()}
