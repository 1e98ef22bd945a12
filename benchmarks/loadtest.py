"""Load test for `argen serve` on the loopback interface, bounded in request count and time.

    # start a server on tiny random checkpoints, load it, stop it gracefully (CPU friendly):
    python benchmarks/loadtest.py --spawn --requests 200 --concurrency 8
    # or load a server that is already running on this machine:
    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --requests 500 --concurrency 16
    # a t2i server taking precomputed caption features (spawned with --text-encoder none):
    python benchmarks/loadtest.py --spawn --kind t2i --features --requests 100
    # open-loop Poisson arrivals, continuous vs static scheduling in one run (issue 18):
    python benchmarks/loadtest.py --spawn --compare --fractions 0.5,0.8 --requests 60
    # many LoRA adapters in one server (issue 26): 4 adapters, requests spread over them, against one adapter
    python benchmarks/loadtest.py --spawn --adapters 4 --requests 120 --concurrency 16

Each request asks for `--images` images of random classes with a random seed (c2i; with
`--prompts` t2i prompts; with `--features` random caption features as base64 .npy, shaped from the
server's /health). Reports latency p50/p99, requests/s, images/s, errors by status, and the
server's own /metrics (mean batch size). Only loopback URLs are accepted.

`--compare` (with `--spawn`): one server per scheduler (`--schedulers`, default static and
continuous), all started at once. On the static server a closed loop (`--calibrate-requests` at
concurrency 2 x `--max-batch-size`) measures its capacity in images/s; then at each `--fractions` x
that capacity (or at `--rates` images/s) the servers take turns with open-loop Poisson arrivals
(seeded: the same arrival times and payloads for each). Each open-loop run sends `--requests` requests (bounded by
`--duration`) and reports throughput, latency p50/p99 (send to answer) and queue wait p50/p99
(the server's `timings.queue_ms`: arrival to admission), then the continuous/static ratios.

`--adapters N` (with `--spawn`): N stand-in LoRA adapters (random, rank `--lora-rank`, on every linear of the
blocks; `benchmarks/standin_adapters.py`) of the tiny base, and three servers started together: two
single-adapter servers, adapter 0 merged into the weights (as `argen merge-lora` writes it) and adapter 0
alone unmerged (`serve --lora a0=DIR`), and one server with all N (`serve --lora a0=DIR ... --lora aN-1=DIR`,
batched LoRA). `--rounds` times, in turn, the same closed loop (`--requests / --rounds` requests) runs against
the merged server, the unmerged one, the multi server with each request naming a random adapter (so every
step mixes them), and the multi server with every request on a0. It reports the median images/s of each and
the medians of the per-round ratios against each single-adapter server (pairing keeps a ratio meaningful on
a machine whose speed drifts; issue 26's target: multi mixed >= 0.8x the single-adapter server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 20000
MAX_SECONDS = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_checkpoints(folder: Path, gpt_name: str, vq_name: str, kind: str = "c2i") -> None:
    import torch

    from argen.checkpoint import save_gpt, save_tokenizer
    from argen.models.gpt import GPT, gpt_config
    from argen.models.tokenizer import VQModel, vq_config

    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config(vq_name)), folder / "vq")
    gpt = GPT(gpt_config(gpt_name, kind=kind))
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    save_gpt(gpt, folder / "gpt")


def write_adapters(folder: Path, count: int, rank: int) -> list[str]:
    """`count` stand-in adapters of folder/gpt in folder/a0.. and adapter 0 merged into folder/merged."""
    from standin_adapters import make_adapter

    from argen.checkpoint import load_gpt, save_gpt

    base = load_gpt(folder / "gpt")
    for k in range(count):
        make_adapter(base, folder / "gpt", folder / f"a{k}", seed=k + 1, rank=rank, std=0.05)
    save_gpt(load_gpt(folder / "gpt", lora=str(folder / "a0")), folder / "merged")
    return [f"a{k}" for k in range(count)]


def spawn_server(folder: Path, port: int, args, scheduler: str | None = None, gpt: str = "gpt",
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "argen.cli.main", "serve", "--tokenizer", str(folder / "vq"), "--gpt",
           str(folder / gpt), *extra, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--log-level", "warning", "--text-encoder", "none"]
    if scheduler is not None:
        cmd += ["--scheduler", scheduler]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_servers(procs: list[subprocess.Popen]) -> None:
    """SIGINT (graceful: in-flight work finishes), then wait; killed after 60 s."""
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def wait_healthy(client: httpx.AsyncClient, deadline: float) -> None:
    while time.perf_counter() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become healthy in time")


def random_features(rng: random.Random, captions: int, length: int, dim: int) -> str:
    """base64 .npy of (captions, tokens <= length, dim) float32 noise: the compact `features` form."""
    array = np.random.default_rng(rng.randrange(2**31)).standard_normal((captions, rng.randint(1, length), dim))
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def run_load(url: str, args) -> dict:
    rng = random.Random(args.seed)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    images = 0
    issued = 0
    start = time.perf_counter()
    stop_at = start + args.duration
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await wait_healthy(client, time.perf_counter() + 60)
        health = (await client.get("/health")).json()
        start = time.perf_counter()
        stop_at = start + args.duration

        async def worker():
            nonlocal images, issued
            while issued < args.requests and time.perf_counter() < stop_at:
                issued += 1
                payload = {"seed": rng.randrange(2**31), "top_k": args.top_k, "cfg_scale": args.cfg_scale}
                if getattr(args, "adapter_names", None):
                    payload["adapter"] = rng.choice(args.adapter_names)
                if args.features:
                    payload["features"] = random_features(rng, args.images, health["caption_len"],
                                                          health["caption_dim"])
                elif args.prompts:
                    payload["prompts"] = [f"test prompt {rng.randrange(1000)}" for _ in range(args.images)]
                else:
                    payload["classes"] = [rng.randrange(args.num_classes) for _ in range(args.images)]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/generate", json=payload)
                    key = str(r.status_code)
                    if r.status_code == 200:
                        images += len(r.json()["images"])
                        latencies.append(time.perf_counter() - t0)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        server_metrics = (await client.get("/metrics")).json()
    lat = np.array(latencies) * 1e3
    ok = statuses.get("200", 0)
    return {
        "requests": sum(statuses.values()), "ok": ok, "errors": sum(statuses.values()) - ok, "statuses": statuses,
        "elapsed_s": elapsed, "requests_per_s": ok / elapsed, "images_per_s": images / elapsed,
        "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_ms_p99": float(np.percentile(lat, 99)) if lat.size else None,
        "server_mean_batch_images": server_metrics.get("mean_batch_images"),
        "server_latency_ms": server_metrics.get("latency_ms"),
    }


def make_payload(rng: random.Random, args, health: dict) -> dict:
    payload = {"seed": rng.randrange(2**31), "top_k": args.top_k, "cfg_scale": args.cfg_scale}
    if args.features:
        payload["features"] = random_features(rng, args.images, health["caption_len"], health["caption_dim"])
    elif args.prompts:
        payload["prompts"] = [f"test prompt {rng.randrange(1000)}" for _ in range(args.images)]
    else:
        payload["classes"] = [rng.randrange(args.num_classes) for _ in range(args.images)]
    return payload


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def open_loop(url: str, args, rate: float) -> dict:
    """Poisson arrivals at `rate` images/s (seeded by --seed): send each request at its arrival
    time whatever the server is doing; at most --requests requests and --duration s of arrivals."""
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.requests)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await wait_healthy(client, time.perf_counter() + 60)
        health = (await client.get("/health")).json()
        for _ in range(3):  # warm-up, not measured
            await client.post("/v1/generate", json=make_payload(random.Random(-1), args, health))
        arrivals, t = [], 0.0
        for _ in range(args.requests):
            t += rng.expovariate(rate / args.images)
            if t > args.duration:
                break
            arrivals.append((t, make_payload(rng, args, health)))
        results: list[tuple[int, float, float | None, int, float]] = []
        start = time.perf_counter()

        async def send(at: float, payload: dict) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/generate", json=payload)
            except httpx.HTTPError:
                results.append((0, 0.0, None, 0, time.perf_counter()))
                return
            body = r.json() if r.status_code == 200 else {}
            results.append((r.status_code, time.perf_counter() - t0, body.get("timings", {}).get("queue_ms"),
                            len(body.get("images", [])), time.perf_counter()))

        await asyncio.gather(*(send(at, payload) for at, payload in arrivals))
        server_metrics = (await client.get("/metrics")).json()
    ok = [r for r in results if r[0] == 200]
    elapsed = (max(r[4] for r in results) - start) if results else 0.0
    latency = [r[1] * 1e3 for r in ok]
    queue = [r[2] for r in ok if r[2] is not None]
    return {"rate_img_s": rate, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "elapsed_s": elapsed, "images_per_s": sum(r[3] for r in ok) / elapsed if elapsed else 0.0,
            "latency_ms_p50": percentile(latency, 50), "latency_ms_p99": percentile(latency, 99),
            "queue_ms_p50": percentile(queue, 50), "queue_ms_p99": percentile(queue, 99),
            "server_slot_occupancy": server_metrics.get("slot_occupancy"),
            "server_mean_batch_images": server_metrics.get("mean_batch_images")}


# issue 18's targets at about 80% of the static capacity: continuous / static
TARGETS = {"queue_ms_p50": ("<=", 0.1), "latency_ms_p50": ("<=", 0.85), "images_per_s": (">=", 0.95)}


def compare(args, folder: Path) -> dict:
    """One spawned server per scheduler, all up at once; capacity calibration on the static one (or
    the first); then for each rate the schedulers take turns, so that a change in the machine's
    load during the run falls on both alike."""
    schedulers = args.schedulers.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in schedulers}
    capacity = None
    procs, urls = [], {}
    try:
        for scheduler in schedulers:
            port = free_port()
            procs.append(spawn_server(folder, port, args, scheduler))
            urls[scheduler] = f"http://127.0.0.1:{port}"
        if args.rates is None:
            calibrate = "static" if "static" in urls else schedulers[0]
            closed = argparse.Namespace(**{**vars(args), "requests": args.calibrate_requests,
                                           "concurrency": 2 * args.max_batch_size})
            capacity = asyncio.run(run_load(urls[calibrate], closed))["images_per_s"]
            print(f"# {calibrate} capacity (closed loop, concurrency {closed.concurrency}): {capacity:.2f} img/s",
                  file=sys.stderr, flush=True)
        rates = ([float(r) for r in args.rates.split(",")] if args.rates is not None
                 else [float(f) * capacity for f in args.fractions.split(",")])
        for rate in rates:
            for scheduler in schedulers:
                row = asyncio.run(open_loop(urls[scheduler], args, rate))
                row["scheduler"] = scheduler
                runs[scheduler].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        stop_servers(procs)
    report = {"static_capacity_img_s": capacity, "runs": runs, "ratios": []}
    if "static" in runs and "continuous" in runs:
        for static, cont in zip(runs["static"], runs["continuous"]):
            ratios = {"rate_img_s": static["rate_img_s"]}
            for key, (op, goal) in TARGETS.items():
                if static[key] and cont[key] is not None:
                    value = cont[key] / static[key]
                    ratios[key] = value
                    met = value <= goal if op == "<=" else value >= goal
                    ratios[f"{key}_target"] = f"{op} {goal}: {'met' if met else 'MISSED'}"
            report["ratios"].append(ratios)
    return report


def print_compare(report: dict) -> None:
    print("| scheduler | arrivals img/s | requests | errors | throughput img/s | latency p50 ms | latency p99 ms "
          "| queue p50 ms | queue p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for rows in report["runs"].values():
        for r in rows:
            print(f"| {r['scheduler']} | {r['rate_img_s']:.2f} | {r['requests']} | {r['errors']} | "
                  f"{r['images_per_s']:.2f} | {fmt(r['latency_ms_p50'])} | {fmt(r['latency_ms_p99'])} | "
                  f"{fmt(r['queue_ms_p50'])} | {fmt(r['queue_ms_p99'])} |")
    for ratio in report["ratios"]:
        parts = [f"{key} {ratio[key]:.3f} ({ratio[key + '_target']})" for key in TARGETS if key in ratio]
        print(f"- continuous/static at {ratio['rate_img_s']:.2f} img/s: " + "; ".join(parts))


def adapters_report(args) -> dict:
    """--adapters N: the single-adapter server (adapter 0 merged) and the server with all N, started together,
    then `--rounds` rounds of closed-loop runs in turn (single, multi mixed, multi on a0), ratios per round."""
    import copy
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_tiny_checkpoints(folder, args.gpt_config, args.vq_config)
        names = write_adapters(folder, args.adapters, args.lora_rank)
        many = tuple(x for name in names for x in ("--lora", f"{name}={folder / name}"))
        ports = {"single": free_port(), "one": free_port(), "multi": free_port()}
        procs = [spawn_server(folder, ports["single"], args, args.scheduler, "merged"),
                 spawn_server(folder, ports["one"], args, args.scheduler, "gpt", many[:2]),
                 spawn_server(folder, ports["multi"], args, args.scheduler, "gpt", many)]
        plan = {"single_merged": ("single", []), "single_unmerged": ("one", names[:1]),
                "multi_mixed": ("multi", names), "multi_one_adapter": ("multi", names[:1])}
        runs: dict[str, list[dict]] = {k: [] for k in plan}
        try:
            for r in range(args.rounds):
                for key, (server, chosen) in plan.items():
                    one = copy.copy(args)
                    one.adapter_names, one.seed = chosen, args.seed + r
                    one.requests = max(1, args.requests // args.rounds)
                    runs[key].append(asyncio.run(run_load(f"http://127.0.0.1:{ports[server]}", one)))
        finally:
            stop_servers(procs)

    def ratios(key: str) -> list[float]:
        return [m["images_per_s"] / s["images_per_s"] for m, s in zip(runs[key], runs["single_merged"])]

    summary = {key: {"images_per_s_median": statistics.median(r["images_per_s"] for r in rows),
                     "latency_ms_p50_median": statistics.median(r["latency_ms_p50"] for r in rows),
                     "errors": sum(r["errors"] for r in rows),
                     "server_mean_batch_images": rows[-1]["server_mean_batch_images"]} for key, rows in runs.items()}
    unmerged = [m["images_per_s"] / s["images_per_s"] for m, s in zip(runs["multi_mixed"], runs["single_unmerged"])]
    return {"runs": summary, "ratio_mixed_vs_single_per_round": ratios("multi_mixed"),
            "ratio_mixed_vs_single": statistics.median(ratios("multi_mixed")),
            "ratio_mixed_vs_single_unmerged": statistics.median(unmerged),
            "ratio_single_unmerged_vs_single": statistics.median(ratios("single_unmerged")),
            "ratio_one_adapter_vs_single": statistics.median(ratios("multi_one_adapter")),
            "settings": {k: getattr(args, k) for k in ("requests", "rounds", "concurrency", "images", "top_k",
                                                         "cfg_scale", "max_batch_size", "max_wait_ms", "gpt_config",
                                                         "vq_config", "adapters", "lora_rank", "scheduler", "seed")}
            | {"threads": os.environ.get("OMP_NUM_THREADS")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start `argen serve` on tiny random checkpoints")
    parser.add_argument("--gpt-config", default="GPT-mini", help="--spawn: generator config (default GPT-mini)")
    parser.add_argument("--vq-config", default="VQ-small-8", help="--spawn: tokenizer config (default VQ-small-8)")
    parser.add_argument("--kind", choices=["c2i", "t2i"], default="c2i",
                        help="--spawn: generator kind (t2i is served with --text-encoder none: use --features)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="--spawn: server batch size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="--spawn: server batching wait")
    parser.add_argument("--max-queue", type=int, default=256, help="--spawn: server queue bound")
    parser.add_argument("--requests", type=int, default=200, help=f"requests to send (at most {MAX_REQUESTS})")
    parser.add_argument("--duration", type=float, default=120.0, help=f"stop issuing after s (<= {MAX_SECONDS})")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--prompts", action="store_true", help="send prompts (t2i servers with a text encoder)")
    parser.add_argument("--features", action="store_true", help="send random caption features (t2i servers)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--compare", action="store_true", help="open-loop Poisson arrivals, schedulers compared")
    parser.add_argument("--schedulers", default="static,continuous", help="--compare: servers, in order")
    parser.add_argument("--fractions", default="0.5,0.8", help="--compare: arrival rates x the static capacity")
    parser.add_argument("--rates", default=None, help="--compare: arrival rates in images/s (no calibration)")
    parser.add_argument("--calibrate-requests", type=int, default=48, help="--compare: closed-loop requests")
    parser.add_argument("--adapters", type=int, default=0, help="--spawn: N LoRA adapters in one server against "
                                                                   "one adapter alone (issue 26)")
    parser.add_argument("--lora-rank", type=int, default=16, help="--adapters: rank of the stand-in adapters")
    parser.add_argument("--rounds", type=int, default=5, help="--adapters: rounds of the four runs in turn")
    parser.add_argument("--scheduler", default=None, help="--spawn: the server's scheduler (default: continuous)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 0 < args.duration <= MAX_SECONDS or args.concurrency < 1:
        parser.error(f"--requests must be in 1..{MAX_REQUESTS}, --duration in (0, {MAX_SECONDS}], --concurrency >= 1")
    if (args.url is None) == (not args.spawn):
        parser.error("give exactly one of --url or --spawn")
    if args.spawn and args.kind == "t2i" and not args.features:
        parser.error("--spawn --kind t2i starts a features-only server: add --features")
    if args.compare:
        if not args.spawn:
            parser.error("--compare needs --spawn")
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_checkpoints(Path(tmp), args.gpt_config, args.vq_config, args.kind)
            report = compare(args, Path(tmp))
        report["settings"] = {k: getattr(args, k) for k in ("requests", "duration", "images", "top_k", "cfg_scale",
                                                              "max_batch_size", "max_wait_ms", "seed", "gpt_config",
                                                              "vq_config", "kind", "calibrate_requests")}
        report["settings"]["threads"] = os.environ.get("OMP_NUM_THREADS")
        print_compare(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0 if all(r["errors"] == 0 for rows in report["runs"].values() for r in rows) else 1
    if args.adapters:
        if not args.spawn or args.kind != "c2i":
            parser.error("--adapters needs --spawn and a c2i model")
        report = adapters_report(args)
        print(json.dumps(report, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0 if all(r["errors"] == 0 for r in report["runs"].values()) else 1
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.spawn:
            write_tiny_checkpoints(Path(tmp), args.gpt_config, args.vq_config, args.kind)
            port = free_port()
            proc = spawn_server(Path(tmp), port, args, args.scheduler)
            url = f"http://127.0.0.1:{port}"
        else:
            url = args.url
            if urlparse(url).hostname not in LOOPBACK:
                parser.error("only loopback servers may be load-tested (127.0.0.1, localhost, ::1)")
        try:
            report = asyncio.run(run_load(url, args))
        finally:
            if proc is not None:
                stop_servers([proc])
    report["settings"] = {k: getattr(args, k) for k in ("requests", "concurrency", "images", "top_k", "cfg_scale",
                                                          "max_batch_size", "max_wait_ms")}
    if args.spawn:
        report["settings"].update(gpt=args.gpt_config, vq=args.vq_config, kind=args.kind,
                                  threads=os.environ.get("OMP_NUM_THREADS"))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
