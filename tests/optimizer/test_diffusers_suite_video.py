"""The video transformer classes of diffusers' own test suite, imported, verified in fp32 and built and verified
in fp16, as test_diffusers_suite.py (which holds the tables and the image transformers) does: a file of its own,
so that CI's two workers, each taking whole files, share the suite."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_diffusers_suite import FP32_ONLY, IMPORTED, VIDEO_CASES, check_imports_and_verifies  # noqa: E402


@pytest.mark.parametrize("name", sorted((IMPORTED | set(FP32_ONLY)) & VIDEO_CASES))
def test_imports_and_verifies(name, tmp_path):
    check_imports_and_verifies(name, tmp_path)
