"""`kiln batch ENGINE_DIR MANIFEST -o OUT`: many clips (a FILM engine) or latent files (a VAE decoder) through
Ray Data, an actor per GPU (or CPU actors), each holding the engine once.

The manifest is JSON lines, one job each: {"input": "clips/a.mp4"} with the job's options ("output",
"factor", "fps", "format"; "chunk" for decode), or a bare path per line. Inputs are relative to the
manifest's folder and may not leave it; outputs are relative to OUT (by default the input's name: a
video stays a video, a folder of frames or a latent file becomes a folder of frames).

Resumable: an output that exists is whole (jobs write into a temporary renamed at the end), so a rerun
skips it, and temporaries that killed workers left are removed at the start. A worker that dies is
restarted by Ray and its job run again; its output is written once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.serve.job_requests import Roots, confined, remove_partials
from kiln.optimizer.serve.jobs import FILM_INPUTS
from kiln.optimizer.serve.protocol import ProtocolError


def job_kind(config) -> str:
    names = {spec.name for spec in config.inputs}
    if FILM_INPUTS <= names:
        return "interpolate"
    if "latent_sample" in names:
        return "decode"
    raise InputError(f"kiln batch runs FILM interpolators and VAE decoders; this engine takes {sorted(names)}",
                     hint="serve other engines' tensors with `kiln serve`")  # fmt: skip


def default_output(source: str, kind: str) -> str:
    path = Path(source)
    if kind == "interpolate" and path.suffix:  # a video: the same name, as .mp4
        return str(path.with_suffix(".mp4"))
    return str(path.with_suffix("")) if path.suffix else source  # frames into a folder


def read_jobs(manifest: Path, kind: str, roots: Roots) -> list[dict]:
    """The manifest's jobs, each checked (paths under the roots, outputs distinct); InputError naming the
    line of the first bad one."""
    if not manifest.is_file():
        raise InputError(f"{manifest}: no such file", hint="give a JSON-lines file, one job per line")
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest}: cannot read it as text ({exc})") from None
    jobs, outputs = [], {}
    for number, line in enumerate(lines, start=1):
        where = f"{manifest}, line {number}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = json.loads(line) if line.lstrip().startswith("{") else {"input": line.strip()}
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})", hint='one job per line: {"input": "clips/a.mp4"} or a bare path') from None
        try:
            source = confined(roots.input, job.get("input"), "input")
            if not source.exists():
                raise ProtocolError(f'"input" {job["input"]!r} does not exist (relative to {roots.input})')
            job.setdefault("output", default_output(job["input"], kind))
            output = confined(roots.output, job["output"], "output")
        except ProtocolError as exc:
            raise InputError(f"{where}: {exc.message}") from None
        if output in outputs:
            raise InputError(f"{where}: output {job['output']!r} is also line {outputs[output]}'s", hint='give one of them another "output"')
        outputs[output] = number
        jobs.append({"line": number, "output": job["output"], "spec": json.dumps(job)})
    if not jobs:
        raise InputError(f"{manifest} lists no jobs", hint='one job per line: {"input": "clips/a.mp4"} or a bare path')
    return jobs


class JobActor:
    """A Ray Data actor: the engine loaded once, then one job per row."""

    def __init__(self, engine_dir: str, roots: Roots):
        from kiln.optimizer.serve.worker import EngineWorker

        self.worker = EngineWorker(Path(engine_dir), roots)
        self.kind = job_kind(self.worker.engine.config)

    def __call__(self, batch: dict) -> dict:
        results = []
        for spec, output in zip(batch["spec"], batch["output"], strict=True):
            started = time.perf_counter()
            try:
                # reuse: an output that exists now was written by this job's earlier try (run() skipped the others)
                done = self.worker.job(self.kind, json.loads(spec), reuse=True)
                results.append({"status": "reused" if done.pop("reused") else "done", **done})
            except ProtocolError as exc:
                results.append({"status": "failed", "error": exc.message, "output": output})
            results[-1]["seconds"] = time.perf_counter() - started
        return {"line": list(batch["line"]), "result": [json.dumps(r) for r in results]}


def run(engine_dir: Path, config, manifest: Path, out: Path, workers: int | None, retries: int, address: str | None,
        progress) -> dict:  # fmt: skip
    import ray

    from kiln.optimizer.serve.ray_start import check_room, init_ray

    kind = job_kind(config)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out} is a file; kiln batch writes into a folder")
    roots = Roots(manifest.parent.resolve(), out.resolve())
    jobs = read_jobs(manifest, kind, roots)  # all checked before anything is written
    cleaned = remove_partials(out)
    pending = [j for j in jobs if not (roots.output / j["output"]).exists()]  # read_jobs kept each under the root
    progress(f"{len(jobs)} job(s): {len(jobs) - len(pending)} done before, {len(pending)} to run" + (f"; removed {cleaned} partial output(s) of a killed run" if cleaned else ""))
    if not pending:
        return summary(kind, manifest, out, jobs, {}, 0.0, cleaned)
    started = time.perf_counter()
    results: dict[int, dict] = {}
    init_ray(address)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # kiln prints a line per job
        gpu = config.device == "cuda"
        workers = min(workers or (int(ray.cluster_resources().get("GPU", 1)) if gpu else 1), len(pending))  # one actor per GPU
        check_room(f"{workers} worker(s), each {'a GPU and ' if gpu else ''}a CPU,", workers if gpu else 0, workers,
                   "lower --workers, or join a larger cluster with --address", address is None, progress)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)  # once the run is sure to start: a refused one leaves nothing
        dataset = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
            JobActor, fn_constructor_args=(str(engine_dir), roots), batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=1 if gpu else 0, num_cpus=1, max_restarts=-1, max_task_retries=retries,
        )  # fmt: skip
        for row in dataset.iter_rows():
            result = results[int(row["line"])] = json.loads(row["result"])
            progress(f"{len(results)}/{len(pending)} job(s) ({result['status']}: {result['output']})")
    finally:
        if not address:
            ray.shutdown()
    cleaned += remove_partials(out)  # the workers are gone: what a killed one left is no output
    return summary(kind, manifest, out, jobs, results, time.perf_counter() - started, cleaned)


def summary(kind: str, manifest: Path, out: Path, jobs: list[dict], results: dict[int, dict], wall: float, cleaned: int) -> dict:
    rows = [{"line": j["line"], **results.get(j["line"], {"status": "skipped", "output": j["output"]})} for j in jobs]
    frames = sum(r.get("frames", 0) for r in rows if r["status"] == "done")
    return {"job": kind, "manifest": str(manifest), "output": str(out), "jobs": rows, "wall_s": wall, "partials_removed": cleaned,
            "done": sum(r["status"] == "done" for r in rows), "skipped": sum(r["status"] == "skipped" for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows), "frames": frames, "fps": frames / wall if wall > 0 else 0.0}  # fmt: skip
