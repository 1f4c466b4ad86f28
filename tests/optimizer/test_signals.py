"""Signals held over what must not be cut: the first import of a framework, a sequence of renames."""

from __future__ import annotations

import signal
import sys

import pytest

from kiln.optimizer.lazy import require
from kiln.optimizer.signals import signals_deferred

# signal.raise_signal reaches this thread at once; os.kill may land on any of the process's threads (ONNX
# Runtime's and torch's pools), and the main thread then sees it only later.
@pytest.fixture(autouse=True)
def python_default_sigint():
    """These tests are about Python's own SIGINT handler (KeyboardInterrupt). In the full CI run an earlier test
    leaves another in place (which one is not found yet), so each test starts from Python's default."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


PROBE = """import signal
signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the import
for _ in range(1000):
    pass  # bytecode, where Python would raise KeyboardInterrupt
FINISHED = True
"""


def test_ctrl_c_during_a_framework_import_waits_for_the_import(tmp_path, monkeypatch):
    """The fuzzing harness found `kiln example vae` aborting (a C++ terminate) or dying of SIGINT
    when Ctrl-C landed inside torch's start-up; the import now finishes first, then Ctrl-C acts."""
    (tmp_path / "kiln_probe_module.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):
            require("kiln_probe_module", "test", "the probe")
        assert sys.modules["kiln_probe_module"].FINISHED
    finally:
        sys.modules.pop("kiln_probe_module", None)


def test_a_signal_in_a_deferred_block_acts_when_it_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("after the signal")
        steps.append("never")
    assert steps == ["after the signal"]
