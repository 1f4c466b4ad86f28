"""Calibration data: reading and validating arrays that feed a model (calibration sets, run inputs)."""

from kiln.calibration.arrays import DataError, check_finite, read_npz

__all__ = ["DataError", "check_finite", "read_npz"]
