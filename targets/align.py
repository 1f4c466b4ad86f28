"""Spatial alignment: models like FILM need H and W divisible by 2^(levels-1). The engine pads inputs
with zeros, centred as the FILM authors' tools do, and crops every spatial output back, so any H×W works."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

METADATA_KEY = "kiln.align"


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Where the original H×W sits in a padded input."""

    top: int
    left: int
    height: int
    width: int
    padded_height: int


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

    def pad(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], CropBox | None]:
        """Feeds (numpy arrays or torch tensors) padded to the alignment, and the box to crop the outputs
        to; None when no padding was needed."""
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
        return padded, CropBox(top, left, height, width, height + pad_h)

    def crop(self, outputs: Mapping[str, np.ndarray], box: CropBox | None) -> dict[str, np.ndarray]:
        """Crop spatial outputs back (views); an output at 1/k resolution (a pyramid level) gets the box scaled by k."""
        if box is None:
            return dict(outputs)
        top, left, height, width = box.top, box.left, box.height, box.width
        cropped = dict(outputs)
        for name, (h_axis, w_axis) in self.outputs.items():
            array = outputs[name]
            scale = box.padded_height // array.shape[h_axis]
            index = [slice(None)] * array.ndim
            index[h_axis] = slice(top // scale, (top + height + scale - 1) // scale)
            index[w_axis] = slice(left // scale, (left + width + scale - 1) // scale)
            cropped[name] = array[tuple(index)]
        return cropped

    def run_padded(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds) -> dict[str, np.ndarray]:
        """run(feeds padded to the alignment), with its spatial outputs cropped back."""
        padded, box = self.pad(feeds)
        return self.crop(run(padded), box)
