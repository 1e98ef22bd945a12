"""The stages of `benchmarks/gpu_check.sh` that no other benchmark covers, one subcommand each.

    python benchmarks/gpu_stages.py train --json train.json        # GPT-B, 256 px, batch 64, bf16
    python benchmarks/gpu_stages.py sample-eval --work /tmp/x       # argen sample-batch, then argen evaluate
    python benchmarks/gpu_stages.py slots --json slots.json         # continuous (SlotDecoder) vs static batches
    python benchmarks/gpu_stages.py jacobi --windows 4,8,8:4x2      # Jacobi decoding (trees too) vs plain
    python benchmarks/gpu_stages.py <stage> --dry ...               # the same on the CPU with tiny settings

- train: `argen.training.generator.train` (the library call behind `argen train`) on random codes
  written to a temporary folder in the codes format (`CodeShardWriter`), random initial weights;
  reports tokens/s per logged step (the first --skip steps, with autotuning and allocator growth,
  left out of the median) and the peak GPU memory the trainer logs.
- sample-eval: random-weight tokenizer and generator saved as argen checkpoints, then the CLI
  itself (`argen sample-batch`, `argen evaluate --inception random` against the packaged demo
  images): wall time of each command and the result keys. The numbers are not FIDs.
- slots: `argen.engine.slots.SlotDecoder` in process, no HTTP: a closed-loop batch of --slots
  requests against `Engine.generate` on the same batch (first call with graph capture, then
  steady), then an open loop of Poisson arrivals at --fraction x the static capacity, served by
  the slot decoder (admitting between steps) and by static batches (whatever waits, up to --slots,
  generated together, padded to --slots rows so that no graph is re-captured while timing); latency
  p50/p99 from arrival to tokens on the host and images/s, bounded by --requests and --duration;
  and the closed-loop batch through `JacobiSlotDecoder` (window --jacobi-window; first call with capture).
- jacobi: `jacobi_decode` against plain decoding (`argen.generate`) on the device, random weights
  (acceptance says nothing about trained models; the cost of a W-token verify forward is the point),
  --images images x --tokens tokens, cfg 4.0, top-k 2000; first call and best of two.
Each subcommand prints a few `- key: value` lines and writes --json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _device(args):
    if args.dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry for the CPU smoke run")
    return torch.device("cuda", torch.cuda.current_device())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(result: dict, path: str | None) -> None:
    for key, value in result.items():
        print(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}", flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str))


# ---------------------------------------------------------------------------------------- train
def write_codes(root: Path, n: int, grid: int, codebook: int, classes: int, downsample: int = 16) -> Path:
    from argen.data.codes import CodeShardWriter

    rng = np.random.default_rng(0)
    meta = {"kind": "c2i", "codebook_size": codebook, "grid": [grid, grid], "image_size": grid * downsample,
            "num_augs": 2, "num_classes": classes}
    writer = CodeShardWriter(root / "codes", meta)
    writer.write_shard(0, rng.integers(0, codebook, (n, 2, grid, grid)), rng.integers(0, classes, n))
    writer.finalize()
    return root / "codes"


def stage_train(args) -> int:
    from argen.training.config import TrainConfig
    from argen.training.generator import train

    device = _device(args)
    if args.dry:
        config, grid, codebook, classes, batch = "GPT-tiny", 4, 512, 10, 8
    else:
        config, grid, codebook, classes, batch = args.config, args.image_size // 16, 16384, 1000, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes = write_codes(root, max(4 * batch, 64), grid, codebook, classes)
        started = time.perf_counter()
        summary = train(TrainConfig(codes=str(codes), out=str(root / "run"), config=config, max_steps=args.steps,
                                    batch_size=batch, precision=None if args.dry else args.precision,
                                    ckpt_every=10 ** 6, log_every=1, tensorboard=False, progress=False,
                                    device=device.type, compile=args.compile))
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    kept = [r for r in records if r.get("step", 0) > args.skip] or records
    tok_s = [r["tokens_per_s"] for r in kept]
    result = {"config": config, "tokens_per_image": grid * grid, "batch": batch,
              "precision": "fp32" if args.dry else args.precision, "compile": args.compile, "steps": args.steps,
              "tokens_per_s_median": statistics.median(tok_s), "tokens_per_s_max": max(tok_s),
              "steps_in_median": len(kept), "peak_gpu_mem_gib": max((r.get("gpu_mem_gb", float("nan"))
                                                                      for r in records), default=None),
              "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss"),
              "wall_s_including_setup_and_final_checkpoint": wall,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    _report(result, args.json)
    return 0


# ---------------------------------------------------------------------------------- sample-eval
def stage_sample_eval(args) -> int:
    import argen
    from argen.models.gpt import GPT, gpt_config
    from argen.models.tokenizer import VQModel, vq_config

    device = _device(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="argen-sample-eval-"))
    torch.manual_seed(0)
    if args.dry:
        vq, gpt = VQModel(vq_config("VQ-tiny")), GPT(gpt_config("GPT-tiny", image_size=8, downsample=2))
        n, batch, dtype = 6, 4, "fp32"
    else:
        vq = VQModel(vq_config(args.vq_config))
        gpt = GPT(gpt_config(args.config, image_size=args.image_size, vocab_size=vq.config.codebook_size))
        n, batch, dtype = args.num_samples, args.batch_size, "bf16"
    torch.nn.init.normal_(gpt.output.weight, std=0.02)  # the default init zeroes the head
    argen.save_tokenizer(vq, work / "ckpt")
    argen.save_gpt(gpt, work / "ckpt")
    cli = [sys.executable, "-m", "argen.cli.main"]
    sample = cli + ["sample-batch", "--tokenizer", str(work / "ckpt"), "--gpt", str(work / "ckpt"),
                    "--device", device.type, "--dtype", dtype, "--num-samples", str(n), "--batch-size", str(batch),
                    "--eval-size", "64", "--top-k", str(args.top_k), "--cfg-scale", "4.0", "--seed", "0",
                    "--out", str(work / "samples"), "--no-progress"]
    evaluate = cli + ["evaluate", "demo", str(work / "samples" / "samples.npz"), "--inception", "random",
                      "--reference-limit", str(n), "--device", device.type, "--fid-method", "eigh",
                      "--out", str(work / "results.json"), "--no-progress"]
    result: dict = {"work": str(work), "num_samples": n, "batch_size": batch}
    code = 0
    for name, cmd in (("sample_batch", sample), ("evaluate", evaluate)):
        print("$ " + " ".join(cmd), flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, text=True, capture_output=True)
        result[f"{name}_s"] = time.perf_counter() - started
        result[f"{name}_exit"] = proc.returncode
        sys.stdout.write(proc.stdout[-3000:])
        sys.stdout.write(proc.stderr[-3000:])
        if proc.returncode:
            code = 1
            break
    if code == 0:
        data = json.loads((work / "results.json").read_text())
        result.update({k: data.get(k) for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                                 "num_samples", "num_reference", "image_size")})
    _report(result, args.json)
    return code


# ---------------------------------------------------------------------------------------- slots
def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def stage_slots(args) -> int:
    from argen.engine import Engine, JacobiSlotDecoder, SlotDecoder, SlotRequest
    from argen.models.gpt import GPT, gpt_config
    from argen.sampling import SamplingParams

    device = _device(args)
    if args.dry:
        name, size, slots, dtype = "GPT-tiny", None, 3, torch.float32
    else:
        name, size, slots, dtype = args.config, args.image_size, args.slots, torch.bfloat16
    with torch.device(device):
        gpt = GPT(gpt_config(name, **({} if size is None else {"image_size": size})))
        torch.nn.init.normal_(gpt.output.weight, std=0.02)
    gpt = gpt.eval().to(dtype=dtype)
    classes = gpt.config.num_classes
    params = SamplingParams(cfg_scale=4.0, top_k=args.top_k if not args.dry else 50)
    engine = Engine(gpt)
    decoder = SlotDecoder(gpt, slots)

    def request(seed: int, tag: int | None = None) -> SlotRequest:
        return SlotRequest(torch.tensor(seed % classes), params=params, tag=tag,
                           generator=torch.Generator(device=device).manual_seed(seed))

    def static(seeds: list[int]) -> None:
        cond = torch.tensor([s % classes for s in seeds], device=device)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        engine.generate(cond, None, params=params, row_generators=gens)

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    batch = list(range(slots))
    result: dict = {"config": gpt.config.name, "image_size": gpt.config.image_size,
                    "tokens": gpt.config.num_image_tokens, "slots": slots, "top_k": params.top_k}
    result["slots_first_s"] = timed(lambda: decoder.run([request(s) for s in batch]))
    result["static_first_s"] = timed(lambda: static(batch))
    result["slots_batch_s"] = min(timed(lambda: decoder.run([request(s) for s in batch])) for _ in range(2))
    result["static_batch_s"] = min(timed(lambda: static(batch)) for _ in range(2))
    jacobi = JacobiSlotDecoder(gpt, slots, window=args.jacobi_window)  # random weights: the step cost counts
    result["jacobi_slots_first_s"] = timed(lambda: jacobi.run([request(s) for s in batch]))
    result["jacobi_slots_batch_s"] = timed(lambda: jacobi.run([request(s) for s in batch]))
    result["jacobi_slots_counters"] = dict(jacobi.counters)
    capacity = slots / result["static_batch_s"]
    rate = args.fraction * capacity
    rng = random.Random(0)
    arrivals, t = [], 0.0
    while len(arrivals) < args.requests and t < args.duration:
        t += rng.expovariate(rate)
        arrivals.append(t)
    result.update({"static_capacity_img_s": capacity, "arrival_rate_img_s": rate, "requests": len(arrivals)})

    def open_loop(kind: str) -> dict:
        done: dict[int, float] = {}
        queue: list[int] = []
        nxt = 0
        start = time.perf_counter()
        while len(done) < len(arrivals):
            now = time.perf_counter() - start
            while nxt < len(arrivals) and arrivals[nxt] <= now:
                queue.append(nxt)
                nxt += 1
            busy = decoder.active if kind == "continuous" else 0
            if not queue and not busy:
                time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
                continue
            if kind == "continuous":
                take, queue = queue[:decoder.free], queue[decoder.free:]
                decoder.admit([request(1000 + i, tag=i) for i in take])
                for finished, tokens in decoder.step():
                    tokens.cpu()  # the tokens have reached the host: the request is answered
                    done[finished.tag] = time.perf_counter() - start
            else:
                take, queue = queue[:slots], queue[slots:]
                # padded to the full batch: one captured graph set serves every batch (the engine pads to
                # powers of two and keeps two sessions, so mixed sizes would re-capture inside the timing)
                static([1000 + i for i in take] + [1000 + take[0]] * (slots - len(take)))
                _sync(device)
                end = time.perf_counter() - start
                done.update({i: end for i in take})
        latency = [(done[i] - arrivals[i]) * 1e3 for i in range(len(arrivals))]
        elapsed = max(done.values()) - arrivals[0]
        return {"images_per_s": len(arrivals) / elapsed, "latency_ms_p50": _pct(latency, 50),
                "latency_ms_p99": _pct(latency, 99)}

    for kind in ("static", "continuous"):
        for key, value in open_loop(kind).items():
            result[f"{kind}_{key}"] = value
    if result["static_latency_ms_p50"]:
        result["continuous/static latency p50"] = result["continuous_latency_ms_p50"] / result["static_latency_ms_p50"]
        result["continuous/static images/s"] = result["continuous_images_per_s"] / result["static_images_per_s"]
    result["decoder_counters"] = dict(decoder.counters)
    _report(result, args.json)
    return 0


# --------------------------------------------------------------------------------------- jacobi
def stage_jacobi(args) -> int:
    """GPT-B (random weights: the cost of a W-token and a tree forward) and the bundled demo-c2i at its
    own settings (trained: real acceptance) through `jacobi_decode`, each --windows entry (W or W:KxD[xG],
    a window with a draft tree) against plain decoding on the same batch."""
    from argen import load_gpt
    from argen.models.gpt import GPT, gpt_config
    from argen.sampling import SamplingParams

    device = _device(args)
    name, size, dtype = ("GPT-tiny", None, torch.float32) if args.dry else (args.config, args.image_size,
                                                                            torch.bfloat16)
    with torch.device(device):
        torch.manual_seed(0)
        gpt = GPT(gpt_config(name, **({} if size is None else {"image_size": size})))
        torch.nn.init.normal_(gpt.output.weight, std=0.02)
    gpt = gpt.eval().to(dtype=dtype)
    n = min(args.tokens, gpt.config.num_image_tokens)
    cond = torch.arange(args.images, device=device) * 7 % gpt.config.num_classes  # (B,)
    params = SamplingParams(cfg_scale=4.0, top_k=args.top_k if not args.dry else 50)
    result: dict = {"config": gpt.config.name, "image_size": gpt.config.image_size, "images": args.images,
                    "tokens": n, "dtype": str(dtype).replace("torch.", "")}
    code = _jacobi_against_plain(gpt, cond, params, n, args.windows, device, result, "")
    demo = load_gpt("demo-c2i", device=device)  # bundled, float32
    demo_n = min(args.tokens, demo.config.num_image_tokens) if args.dry else demo.config.num_image_tokens
    for batch in (1, args.images):
        classes = torch.arange(batch, device=device) % demo.config.num_classes
        code |= _jacobi_against_plain(demo, classes, SamplingParams.for_model(demo), demo_n, args.windows, device,
                                      result, f"demo_b{batch}_")
    _report(result, args.json)
    return code


def _jacobi_against_plain(gpt, cond, params, n: int, windows: list[str], device, result: dict, prefix: str) -> int:
    """Plain decoding, then `jacobi_decode` for each window entry, on one batch: seconds (first call with
    graph capture, then the best of 2), forward passes per image, acceptance, ms per forward; into
    `result` under `prefix`. Returns 1 if an entry failed (its error is recorded), else 0."""
    from argen.engine import generate
    from argen.engine.jacobi import jacobi_decode

    def gen():
        return torch.Generator(device=device).manual_seed(0)

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    ar = lambda: generate(gpt, cond, params=params, max_new_tokens=n, generator=gen())  # noqa: E731
    result[f"{prefix}ar_first_s"], _ = timed(ar)
    result[f"{prefix}ar_s"] = min(timed(ar)[0] for _ in range(2))
    code = 0
    for entry in windows:
        window, _, tree = entry.partition(":")
        key = f"{prefix}W{entry.replace(':', '_')}"
        try:
            run = lambda w=int(window), t=tree or None: jacobi_decode(  # noqa: E731
                gpt, cond, None, params, window=w, tree=t, max_new_tokens=n, generator=gen())
            result[f"{key}_first_s"], _ = timed(run)
            t, res = min((timed(run) for _ in range(2)), key=lambda x: x[0])
            result[f"{key}_s"] = t
            result[f"{key}_forwards_per_image"] = float(res.forwards.double().mean())
            result[f"{key}_acceptance"] = res.acceptance_rate
            result[f"{key}_ms_per_forward"] = 1e3 * t / res.model_calls
            result[f"{key}_speedup_vs_ar"] = result[f"{prefix}ar_s"] / t
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next window
            code = 1
            result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "sample-eval", "slots", "jacobi"])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny models, few steps (smoke run)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--config", default="GPT-B")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=12, help="train: optimizer steps")
    parser.add_argument("--skip", type=int, default=3, help="train: first steps left out of the median")
    parser.add_argument("--batch-size", type=int, default=64, help="train / sample-eval batch")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="train: torch.compile the model")
    parser.add_argument("--vq-config", default="VQ-16", help="sample-eval: tokenizer config")
    parser.add_argument("--num-samples", type=int, default=64, help="sample-eval: images")
    parser.add_argument("--work", default=None, help="sample-eval: folder for checkpoints and outputs")
    parser.add_argument("--slots", type=int, default=16, help="slots: decoder slots = static batch size")
    parser.add_argument("--fraction", type=float, default=0.8, help="slots: arrival rate x static capacity")
    parser.add_argument("--jacobi-window", type=int, default=8, help="slots: window of the Jacobi slot decoder")
    parser.add_argument("--requests", type=int, default=48, help="slots: open-loop requests")
    parser.add_argument("--duration", type=float, default=20.0, help="slots: seconds of arrivals at most")
    parser.add_argument("--windows", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                        default=["4", "8"], help="jacobi: windows, W or W:KxD[xG] (a draft tree)")
    parser.add_argument("--images", type=int, default=8, help="jacobi: images per batch (with guidance)")
    parser.add_argument("--tokens", type=int, default=64, help="jacobi: tokens per image")
    args = parser.parse_args(argv)
    if args.dry:
        args.steps, args.skip, args.requests = min(args.steps, 4), 1, min(args.requests, 8)
    return {"train": stage_train, "sample-eval": stage_sample_eval, "slots": stage_slots,
            "jacobi": stage_jacobi}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
