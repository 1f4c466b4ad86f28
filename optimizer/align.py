"""Spatial alignment: models like FILM need H and W divisible by 2^(levels-1). The engine pads inputs
with zeros, centred as the FILM authors' tools do, and crops every spatial output back, so any H×W works."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from targets import Engine

METADATA_KEY = "kiln.align"


@dataclasses.dataclass(frozen=True)
class Alignment:
    multiple: int
    inputs: Mapping[str, tuple[int, int]]  # input name -> (height axis, width axis)
    outputs: Mapping[str, tuple[int, int]]

    def rule(self) -> str:
        names = ", ".join(self.inputs)
        return (
            f"height and width of {names} must be multiples of {self.multiple}; kiln's engine pads other sizes "
            f"with zeros (centred) up to the next multiple and crops the outputs back"
        )

    def to_json(self) -> dict:
        return {"multiple": self.multiple, "inputs": {k: list(v) for k, v in self.inputs.items()},
                "outputs": {k: list(v) for k, v in self.outputs.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping) -> Alignment:
        return cls(
            int(data["multiple"]),
            {k: tuple(v) for k, v in data["inputs"].items()},
            {k: tuple(v) for k, v in data["outputs"].items()},
        )

    def padded_size(self, size: int) -> int:
        return -(-size // self.multiple) * self.multiple

    def padded_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        padded = {}
        for name, shape in shapes.items():
            shape = list(shape)
            for axis in self.inputs.get(name, ()):
                shape[axis] = self.padded_size(shape[axis])
            padded[name] = tuple(shape)
        return padded

    def pad(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[int, int, int, int] | None]:
        """Feeds padded to the alignment, and the crop box (top, left, height, width); None when none was needed."""
        sizes = {(feeds[n].shape[h], feeds[n].shape[w]) for n, (h, w) in self.inputs.items() if n in feeds}
        if len(sizes) != 1:
            raise ValueError(f"the inputs {', '.join(self.inputs)} must share one height and width, got {sorted(sizes)}")
        height, width = sizes.pop()
        pad_h, pad_w = self.padded_size(height) - height, self.padded_size(width) - width
        if not pad_h and not pad_w:
            return dict(feeds), None
        top, left = pad_h // 2, pad_w // 2
        padded = dict(feeds)
        for name, (h_axis, w_axis) in self.inputs.items():
            value = feeds[name]
            shape, inside = list(value.shape), [slice(None)] * value.ndim
            shape[h_axis], shape[w_axis] = height + pad_h, width + pad_w
            inside[h_axis], inside[w_axis] = slice(top, top + height), slice(left, left + width)
            # numpy arrays and torch tensors alike (the GPU pipeline pads on the device)
            padded[name] = value.new_zeros(shape) if hasattr(value, "new_zeros") else np.zeros(shape, value.dtype)
            padded[name][tuple(inside)] = value
        return padded, (top, left, height, width)

    def crop(self, outputs: Mapping[str, np.ndarray], box, padded_hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """Crop spatial outputs back; an output at 1/k resolution (a pyramid level) gets the box scaled by k."""
        if box is None:
            return dict(outputs)
        top, left, height, width = box
        cropped = dict(outputs)
        for name, (h_axis, w_axis) in self.outputs.items():
            array = outputs[name]
            scale = padded_hw[0] // array.shape[h_axis]
            index = [slice(None)] * array.ndim
            index[h_axis] = slice(top // scale, (top + height + scale - 1) // scale)
            index[w_axis] = slice(left // scale, (left + width + scale - 1) // scale)
            cropped[name] = array[tuple(index)]
        return cropped


    def run_padded(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds) -> dict[str, np.ndarray]:
        """run(feeds padded to the alignment), with its spatial outputs cropped back."""
        padded, box = self.pad(feeds)
        name, (h_axis, w_axis) = next(iter(self.inputs.items()))
        return self.crop(run(padded), box, (padded[name].shape[h_axis], padded[name].shape[w_axis]))


class AlignedEngine:
    """An engine that takes any H×W: it pads to the alignment, runs, and crops back."""

    def __init__(self, engine: Engine, alignment: Alignment):
        self.engine = engine
        self.alignment = alignment
        self.inputs, self.outputs, self.profile = engine.inputs, engine.outputs, engine.profile

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.alignment.run_padded(self.engine.run, feeds)

    def __getattr__(self, name: str):
        # device_runner exists exactly when the wrapped engine has one (bench looks for it).
        if name == "device_runner" and hasattr(self.engine, "device_runner"):
            return lambda feeds: self.engine.device_runner(self.alignment.pad(feeds)[0])
        raise AttributeError(name)
