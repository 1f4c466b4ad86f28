"""kiln's scale-out on the GPUs of one host (issue 21): throughput as replicas or workers are added, one
per GPU, and Ray Serve's autoscaler under a step of load.

    python benchmarks/scale_out.py prepare WORK [--film FILM_ONNX] [--clips 32] [--frames 8]
    python benchmarks/scale_out.py serve WORK --counts 1,2,4,8 [--clients-per-replica 16] [--requests-per-replica 200]
    python benchmarks/scale_out.py batch WORK --counts 1,2,4,8
    python benchmarks/scale_out.py autoscale WORK --max 8 [--load-s 90] [--idle-s 90]

prepare: on a GPU machine, the DiT-XL/2 fp16 engine of serve_gpu.py (256² b8, static, CUDA graph) and,
with --film, FILM fp16 frozen to 1080p with a manifest of --clips clips of --frames 1080p frames each.
Without a GPU (or with --cpu), stand-ins that run anywhere: a cpu engine that costs about 0.4 GFLOP a
row (tests/optimizer/cluster_models.py) and a toy VAE decoder with a manifest of latent files. Every
cpu replica or worker then runs one thread (KILN_THREADS=1) on --replica-cpus 1.

serve: `kiln serve WORK/serve --replicas N` for each N, C = N x --clients-per-replica clients on kept-alive
connections. Every answer is checked against the engine run here on the same input (inputs differ per
request), and the replicas' own stats (/v2/models/NAME/stats, asked until each replica answered) must
add up to one run per request: nothing lost, nothing run twice. Efficiency = rate(N) / (N x rate(1)).

batch: `kiln batch WORK/batch WORK/jobs.jsonl --workers N` for each N into a fresh folder; every job must be
done, with the frames it should have, and no other output. Clips per minute over the whole run (Ray's
start and each worker's engine load included, as a user waits for them), and in the steady state: the
jobs after each worker's first, over the time from the N-th result to the last.

autoscale: `kiln serve WORK/serve --replicas 1..MAX` on a Ray instance this process starts. Idle, then a
step of 4 x MAX closed-loop clients for --load-s, then idle again; Ray Serve's replica states and the
answers per second every half second. Prints the table of changes and writes WORK/autoscale.json and
WORK/autoscale.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_gpu import KILN, Server, binary_request, dit_engine, engine_feeds, film_engine  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent / "tests" / "optimizer"
DISTINCT = 8  # distinct inputs the requests cycle through, each answer checked against its own


def gpu_count() -> int:
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return len(done.stdout.splitlines()) if done and done.returncode == 0 else 0


def prepare(work: Path, film_onnx: Path | None, clips: int, frames: int, cpu: bool) -> None:
    if cpu or not gpu_count():
        prepare_cpu(work, clips)
        return
    link(dit_engine(work), work / "serve")
    if film_onnx:
        from serve_pipeline import film_frames

        link(film_engine(work, film_onnx), work / "batch")
        film_frames(work / "clips" / "c0000", frames)
        for k in range(1, clips):  # the same frames under each clip's name: the engine's work does not depend on them
            link(work / "clips" / "c0000", work / "clips" / f"c{k:04d}")
        write_manifest(work, [f"clips/c{k:04d}" for k in range(clips)])


def prepare_cpu(work: Path, clips: int) -> None:
    sys.path.insert(0, str(TESTS))
    from cluster_models import build, slow_model, toy_decoder

    if not (work / "serve").exists():
        build(slow_model(work / "slow.onnx"), work / "serve", "batch=1", "rows=8")
    if not (work / "batch").exists():
        build(toy_decoder(work / "dec.onnx"), work / "batch", "batch=1..2..4", "height=32", "width=32")
    (work / "clips").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(clips):
        np.save(work / "clips" / f"c{k:04d}.npy", rng.standard_normal((24, 4, 32, 32)).astype(np.float32))
    write_manifest(work, [f"clips/c{k:04d}.npy" for k in range(clips)])


def link(target: Path, name: Path) -> None:
    if not name.exists():
        name.symlink_to(target.resolve(), target_is_directory=True)


def write_manifest(work: Path, inputs: list[str]) -> None:
    (work / "jobs.jsonl").write_text("".join(json.dumps({"input": i, "output": f"out/{Path(i).stem}"}) + "\n" for i in inputs))


def is_cpu(engine_dir: Path) -> bool:
    from kiln.targets import read_manifest

    return read_manifest(engine_dir.resolve() / "engine").device == "cpu"


def cpu_options(engine_dir: Path) -> list[str]:
    return ["--replica-cpus", "1"] if is_cpu(engine_dir) else []


def distinct_inputs(engine_dir: Path) -> tuple[list[dict], list[dict]]:
    """DISTINCT inputs (the opt shape, each scaled differently) and the engine's outputs for them, run here
    (then released: the replicas want the GPU)."""
    import gc

    from kiln.optimizer.run import open_engine

    base = engine_feeds(engine_dir.resolve())
    inputs = [{k: (v * (1 + 0.25 * i)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in base.items()} for i in range(DISTINCT)]
    engine = open_engine(engine_dir)
    wants = [engine.run(feeds) for feeds in inputs]
    del engine
    gc.collect()
    return inputs, wants


def read_outputs(content: bytes, length: int) -> dict[str, np.ndarray]:
    from kiln.optimizer.serve.protocol import numpy_dtype

    header, offset, outputs = json.loads(content[:length]), length, {}
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        outputs[out["name"]] = np.frombuffer(content[offset:offset + size], numpy_dtype(out["datatype"])).reshape(out["shape"])
        offset += size
    return outputs


def close(got: dict, want: dict) -> bool:
    """Within fp16 rounding of the output for this request's input (the inputs differ by a quarter or more)."""
    return all(np.abs(got[k].astype(np.float32) - w.astype(np.float32)).max() <= 2e-2 * (np.abs(w.astype(np.float32)).max() + 1e-3)
               for k, w in want.items())  # fmt: skip


def replica_items(url: str, model: str, replicas: int) -> int:
    """Items run, summed over the replicas' stats (asked until every replica answered)."""
    import requests

    seen = {}
    for _ in range(50 * replicas):
        stats = requests.get(f"{url}/v2/models/{model}/stats", timeout=30).json()
        seen[stats["replica"]] = stats["items"]
        if len(seen) == replicas:
            return sum(seen.values())
    raise SystemExit(f"stats came from {len(seen)} replica(s) of {replicas}")


def drive(url: str, model: str, bodies: list[tuple[bytes, dict]], wants: list[dict], total: int, clients: int) -> dict:
    """total requests from clients threads on kept-alive connections, request i with input i % DISTINCT;
    a 503 is sent again after Retry-After. Returns the rate, latencies and how many answers were right."""
    import requests

    next_index, lock = iter(range(total)), threading.Lock()

    def client(_):
        session, done = requests.Session(), []
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return done
            body, headers = bodies[i % DISTINCT]
            start = time.perf_counter()
            while (response := session.post(f"{url}/v2/models/{model}/infer", data=body, headers=headers, timeout=300)).status_code == 503:
                time.sleep(float(response.headers.get("retry-after", 1)))
            ok = response.status_code == 200 and close(read_outputs(response.content, int(response.headers["Inference-Header-Content-Length"])), wants[i % DISTINCT])
            done.append((i, time.perf_counter() - start, ok))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = [a for answers in pool.map(client, range(clients)) for a in answers]
    wall = time.perf_counter() - started
    ms = np.array([a[1] for a in answers]) * 1e3
    return {"requests": total, "answered": len({a[0] for a in answers}), "correct": sum(a[2] for a in answers), "per_s": len(answers) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def serve_scaling(work: Path, counts: list[int], clients_per_replica: int, requests_per_replica: int) -> None:
    engine_dir = work / "serve"
    inputs, wants = distinct_inputs(engine_dir)
    bodies = [binary_request(feeds) for feeds in inputs]
    rows = []
    for n in counts:
        server = Server(f"serve={engine_dir}", "--replicas", n, "--max-queued", 4 * n * clients_per_replica, *cpu_options(engine_dir))
        try:
            for _ in range(2 * n):  # warm-up: each replica's first requests
                drive(server.url, "serve", bodies, wants, 1, 1)
            before = replica_items(server.url, "serve", n)
            result = drive(server.url, "serve", bodies, wants, n * requests_per_replica, n * clients_per_replica)
            result["ran"] = replica_items(server.url, "serve", n) - before
        finally:
            server.stop()
        rows.append((n, result))
        print(f"  {n} replica(s): {result['per_s']:.1f} runs/s", flush=True)
    base = rows[0][1]["per_s"] / rows[0][0]
    print(f"\nkiln serve of {engine_dir.resolve().name}: replicas against throughput, {clients_per_replica} clients and "
          f"{requests_per_replica} requests per replica\n")  # fmt: skip
    print("| replicas | clients | requests | answered, correct | runs on the replicas | runs/s | p50 ms | p99 ms | efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in rows:
        print(f"| {n} | {n * clients_per_replica} | {r['requests']} | {r['answered']}, {r['correct']} | {r['ran']} | {r['per_s']:.1f} "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['per_s'] / (n * base):.1%} |")  # fmt: skip


def timed_batch(*args) -> tuple[dict, list[float]]:
    """kiln batch's summary, and when each job's result came back (its progress lines, stamped here)."""
    process = subprocess.Popen([*KILN, "batch", *map(str, args), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps, log = [], []
    for line in process.stderr:
        log.append(line)
        if re.match(r"kiln: \d+/\d+ job\(s\)", line):
            stamps.append(time.perf_counter())
    summary = process.stdout.read()
    if process.wait():
        raise SystemExit(f"kiln batch failed:\n{''.join(log)[-3000:]}")
    return json.loads(summary), stamps


def batch_scaling(work: Path, counts: list[int]) -> None:
    jobs = [json.loads(line) for line in (work / "jobs.jsonl").read_text().splitlines()]
    rows = []
    for n in counts:
        out = work / f"batch-out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        summary, stamps = timed_batch(work / "batch", work / "jobs.jsonl", "-o", out, "--workers", n)
        frames = {r["frames"] for r in summary["jobs"]}
        written = sorted(str(p.relative_to(out / "out")) for p in (out / "out").iterdir())
        files = sum(1 for p in (out / "out").rglob("*") if p.is_file())
        whole = summary["done"] == len(jobs) and len(frames) == 1 and written == sorted(Path(j["output"]).name for j in jobs)
        # Steady state: the jobs after each worker's first, over the time they took.
        steady = (len(stamps) - n) / (stamps[-1] - stamps[n - 1]) if len(stamps) > n else float("nan")
        rows.append((n, summary, whole and files == frames.pop() * len(jobs), steady))
        print(f"  {n} worker(s): {summary['done']} jobs in {summary['wall_s']:.1f} s", flush=True)
    base = [rows[0][1]["done"] / rows[0][1]["wall_s"], rows[0][3]]
    print(f"\nkiln batch of {(work / 'batch').resolve().name}: workers against throughput, {len(jobs)} jobs\n")
    print("| workers | jobs done | every output once and whole | frames | wall s | jobs/min | efficiency | steady jobs/min | steady efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, s, whole, steady in rows:
        rate = s["done"] / s["wall_s"]
        print(f"| {n} | {s['done']} | {'yes' if whole else 'NO'} | {s['frames']} | {s['wall_s']:.1f} | {60 * rate:.1f} | {rate / (n * base[0]):.1%} "
              f"| {60 * steady:.1f} | {steady / (n * base[1]):.1%} |")  # fmt: skip


def autoscale(work: Path, most: int, load_s: float, idle_s: float, lead_s: float = 10) -> None:
    """The replica timeline of `kiln serve --replicas 1..most` under a step of load."""
    import ray
    from ray import serve

    engine_dir = work / "serve"
    resources = {"num_cpus": most + 1} if is_cpu(engine_dir) else {}
    ray.init(include_dashboard=False, log_to_driver=False, **resources)
    server = Server(f"serve={engine_dir}", "--replicas", f"1..{most}", "--max-queued", 64 * most, "--address", ray.get_runtime_context().gcs_address,
                    *cpu_options(engine_dir))  # fmt: skip
    inputs, _ = distinct_inputs(engine_dir)
    body, headers = binary_request(inputs[0])
    answered, lock, stop_load, samples = [0], threading.Lock(), threading.Event(), []

    def client():
        import requests

        session = requests.Session()
        while not stop_load.is_set():
            response = session.post(f"{server.url}/v2/models/serve/infer", data=body, headers=headers, timeout=300)
            if response.status_code == 200:
                with lock:
                    answered[0] += 1
            else:
                time.sleep(0.2)

    started = time.monotonic()
    plan = [("idle", lead_s), ("load", load_s), ("idle", idle_s)]
    try:
        for phase, seconds in plan:
            threads = [threading.Thread(target=client, daemon=True) for _ in range(4 * most)] if phase == "load" else []
            stop_load.clear()
            for thread in threads:
                thread.start()
            until, last, last_t = time.monotonic() + seconds, answered[0], time.monotonic()
            while time.monotonic() < until:
                time.sleep(0.5)
                states = serve.status().applications["kiln-serve"].deployments["model"].replica_states
                now, now_t = answered[0], time.monotonic()
                samples.append({"t": now_t - started, "phase": phase, "running": states.get("RUNNING", 0),
                                "starting": states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0), "stopping": states.get("STOPPING", 0),
                                "answers_per_s": (now - last) / (now_t - last_t)})  # fmt: skip
                last, last_t = now, now_t
            stop_load.set()
            for thread in threads:
                thread.join()
    finally:
        server.stop()
        ray.shutdown()
    (work / "autoscale.json").write_text(json.dumps(samples, indent=1) + "\n")
    print_timeline(samples, most, lead_s, lead_s + load_s)
    plot_timeline(samples, most, lead_s, lead_s + load_s, work / "autoscale.png")


def print_timeline(samples: list[dict], most: int, load_at: float, idle_at: float) -> None:
    up = next((s["t"] - load_at for s in samples if s["phase"] == "load" and s["running"] == most), None)
    down = next((s["t"] - idle_at for s in samples if s["t"] >= idle_at and s["running"] == 1), None)
    print(f"\nautoscaling 1..{most}: load of {4 * most} clients from {load_at:.0f} s to {idle_at:.0f} s\n")
    print("| t s | phase | running | starting | stopping | answers/s |\n|---|---|---|---|---|---|")
    previous = None
    for s in samples:
        key = (s["phase"], s["running"], s["starting"], s["stopping"])
        if key != previous:
            print(f"| {s['t']:.1f} | {s['phase']} | {s['running']} | {s['starting']} | {s['stopping']} | {s['answers_per_s']:.0f} |")
        previous = key
    say = lambda x: "not reached" if x is None else f"{x:.1f} s"  # noqa: E731
    print(f"\n{most} replicas running {say(up)} after the load began; back to 1 {say(down)} after it ended")


def plot_timeline(samples: list[dict], most: int, load_at: float, idle_at: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.step(t, [s["running"] for s in samples], where="post", label="running")
    top.step(t, [s["starting"] for s in samples], where="post", label="starting", linestyle="--")
    top.set_ylabel("replicas")
    top.set_ylim(0, most + 0.5)
    top.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top.legend(loc="upper right")
    bottom.plot(t, [s["answers_per_s"] for s in samples], color="tab:green")
    bottom.set_ylabel("answers/s")
    bottom.set_xlabel("seconds")
    for axis in (top, bottom):
        axis.axvspan(load_at, idle_at, color="tab:orange", alpha=0.12, label="load")
        axis.grid(alpha=0.3)
    top.set_title(f"kiln serve --replicas 1..{most}: a step of {4 * most} clients")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["prepare", "serve", "batch", "autoscale"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--film", type=Path, help="prepare: FILM's ONNX graph (benchmarks/film_gpu.py prepare)")
    parser.add_argument("--cpu", action="store_true", help="prepare: the cpu stand-ins even on a GPU machine")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--counts", default="1,2,4,8", help="replicas or workers to measure, one per GPU")
    parser.add_argument("--clients-per-replica", type=int, default=16)
    parser.add_argument("--requests-per-replica", type=int, default=200)
    parser.add_argument("--max", type=int, default=gpu_count() or 2)
    parser.add_argument("--load-s", type=float, default=90)
    parser.add_argument("--idle-s", type=float, default=90)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # one machine, loopback only
    os.environ.setdefault("KILN_THREADS", "1")  # a cpu replica or worker: one thread on its one CPU
    counts = [int(c) for c in args.counts.split(",")]
    if args.case == "prepare":
        prepare(args.work, args.film, args.clips, args.frames, args.cpu)
    elif args.case == "serve":
        serve_scaling(args.work, counts, args.clients_per_replica, args.requests_per_replica)
    elif args.case == "batch":
        batch_scaling(args.work, counts)
    else:
        autoscale(args.work, args.max, args.load_s, args.idle_s)


if __name__ == "__main__":
    main()
