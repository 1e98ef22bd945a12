"""Load test for `argen serve` on the loopback interface, bounded in request count and time.

    # start a server on tiny random checkpoints, load it, stop it gracefully (CPU friendly):
    python benchmarks/loadtest.py --spawn --requests 200 --concurrency 8
    # or load a server that is already running on this machine:
    python benchmarks/loadtest.py --url http://127.0.0.1:8000 --requests 500 --concurrency 16
    # a t2i server taking precomputed caption features (spawned with --text-encoder none):
    python benchmarks/loadtest.py --spawn --kind t2i --features --requests 100

Each request asks for `--images` images of random classes with a random seed (c2i; with
`--prompts` t2i prompts; with `--features` random caption features as base64 .npy, shaped from the
server's /health). Reports latency p50/p99, requests/s, images/s, errors by status, and the
server's own /metrics (mean batch size). Only loopback URLs are accepted.
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


def spawn_server(folder: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "argen.cli.main", "serve", "--tokenizer", str(folder / "vq"), "--gpt",
           str(folder / "gpt"), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--log-level", "warning", "--text-encoder", "none"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or not 0 < args.duration <= MAX_SECONDS or args.concurrency < 1:
        parser.error(f"--requests must be in 1..{MAX_REQUESTS}, --duration in (0, {MAX_SECONDS}], --concurrency >= 1")
    if (args.url is None) == (not args.spawn):
        parser.error("give exactly one of --url or --spawn")
    if args.spawn and args.kind == "t2i" and not args.features:
        parser.error("--spawn --kind t2i starts a features-only server: add --features")
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.spawn:
            write_tiny_checkpoints(Path(tmp), args.gpt_config, args.vq_config, args.kind)
            port = free_port()
            proc = spawn_server(Path(tmp), port, args)
            url = f"http://127.0.0.1:{port}"
        else:
            url = args.url
            if urlparse(url).hostname not in LOOPBACK:
                parser.error("only loopback servers may be load-tested (127.0.0.1, localhost, ::1)")
        try:
            report = asyncio.run(run_load(url, args))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # graceful: finishes in-flight work
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
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
