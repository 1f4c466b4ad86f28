"""The real Triton Inference Server that PyTriton's wheel (nvidia-pytriton, the [triton] extra) ships:
its tritonserver binary and Python backend, run on a model repository kiln exported.

kiln runs the binary on its repository itself rather than through PyTriton's Python API: that API
serves Python functions through a proxy model that forwards each batch to the calling process over
ZeroMQ, a hop the exported repository does not need. Its model.py loads the engine inside Triton's own
Python-backend process, as it would in any Triton deployment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kiln.optimizer.errors import InputError

# Python-backend tensors go through shared memory; a region grown 1 MB at a time (the default) takes
# hundreds of steps for a 1080p frame pair.
SHM_BYTES = 64 << 20


def distribution() -> Path:
    """PyTriton's tritonserver folder (bin/, backends/, python_backend_stubs/), found without importing PyTriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("Triton's server is not installed: kiln runs the tritonserver that nvidia-pytriton ships",
                        hint="pip install 'kiln-ml[triton]'")  # fmt: skip
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def backend_dir(workdir: Path) -> Path:
    """A backends folder whose Python backend has the stub for this Python (PyTriton ships one per minor)."""
    dist = distribution()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise InputError(f"nvidia-pytriton has no Python-backend stub for Python {version}", hint="run kiln on a Python PyTriton supports")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True)
    for source in [*(dist / "backends" / "python").iterdir(), stub]:
        (python / source.name).symlink_to(source)
    return python.parent


def environment() -> dict[str, str]:
    """The stub finds its Python by PATH (so kiln's environment, a venv included) and links this
    Python's libpython before any other of its version; the server finds its libraries in PyTriton's
    nvidia_pytriton.libs."""
    env = dict(os.environ)
    libs = distribution().parent.parent / "nvidia_pytriton.libs"
    own = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [own, env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # The stub's Python ignores PYTHONPATH; model.py puts kiln's own import path first from this.
    env["KILN_SYS_PATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def command(repo: Path, backends: Path, host: str, http_port: int, grpc_port: int, drain_s: float) -> list[str]:
    """drain_s: how long Triton waits at SIGTERM for requests in flight, and for clients' kept-alive HTTP
    connections (a client that keeps one open holds the exit that long)."""
    return [
        str(distribution() / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        "--allow-metrics=false", "--log-verbose=0", f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}", f"--exit-timeout-secs={max(1, round(drain_s))}",
    ]  # fmt: skip


@contextlib.contextmanager
def running(repo: Path, host: str, http_port: int, grpc_port: int, timeout: float, log: Path | None = None,
            drain_s: float = 30) -> Iterator[subprocess.Popen]:
    """tritonserver on repo, yielded once every model is ready; stopped (SIGTERM: Triton finishes the
    requests in flight, then exits) when the block ends. A server that dies while loading raises with
    its log's last lines."""
    with tempfile.TemporaryDirectory(prefix="kiln-triton-") as work:
        work = Path(work)
        log = log or work / "tritonserver.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(command(repo, backend_dir(work), host, http_port, grpc_port, drain_s), stdout=sink, stderr=subprocess.STDOUT,
                                       env=environment(), start_new_session=True)  # fmt: skip
        try:
            wait_ready(process, f"http://{host}:{http_port}", timeout, log)
            yield process
        finally:
            stop(process, drain_s + 30)


def wait_ready(process: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InputError(f"tritonserver exited with code {process.returncode} before it was ready:\n{tail(log)}",
                            hint="the lines above are Triton's log")  # fmt: skip
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise InputError(f"tritonserver was not ready after {timeout:.0f} s:\n{tail(log)}", hint="raise --timeout for a large engine")


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the server and its Python-backend stubs
            process.wait()
    return process.returncode


def tail(log: Path, lines: int = 15) -> str:
    """Triton's error lines (a model's load error is far above the end, under the tables it prints), then
    the log's last lines."""
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace").splitlines()
        errors = [line[:2000] for line in text if line.startswith("E")]
        return "\n".join([*errors[-5:], *(["..."] if errors else []), *text[-lines:]])
    return "(no log)"
