"""Calibration data: reading and validating arrays that feed a model (calibration sets, run inputs),
activation statistics and their cache, and the quality metrics quantization is judged by."""

from kiln.calibration.arrays import DataError, check_finite, read_npz
from kiln.calibration.samples import CalibrationSet, Sample, check_calibration, read_calibration

__all__ = ["CalibrationSet", "DataError", "Sample", "check_calibration", "check_finite", "read_calibration", "read_npz"]
