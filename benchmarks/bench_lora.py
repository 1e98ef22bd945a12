"""Fine-tuning vs LoRA vs training from scratch on held-out demo categories (issue 26, part 4).

    python benchmarks/bench_lora.py --work runs/bench-lora [--pretrain-steps 1200] [--steps 450]
        [--evals 50,100,150,300,450] [--holdout "Flags,Food & Drink"] [--jobs 2]

1. Codes: the bundled emoji training split, encoded by the bundled VQ-demo tokenizer (flip only), split
   into the 8 kept categories ("pre", relabelled 0..7) and the 2 held-out ones ("new", 0..1), each with
   its category names.
2. Pretrain a GPT-demo c2i generator on "pre" (`argen train`, batch 32, lr 8e-3 per 256, 200 warm-up
   steps, constant, dropout 0.05: the bundled generators' settings without the cosine decay).
3. On "new", for `--steps` steps each, at equal batch 32: from scratch (as the pretraining), full
   fine-tuning (`--init-from` the pretrained run; its class rows rebuilt from the mean; lr 2e-3), and
   LoRA rank 4, 8 and 16 (`--lora-rank`, lr 8e-3). Each run stops at every step in `--evals` and resumes
   (exact resume, constant schedule: the curve is the one uninterrupted run's), and its weights (or
   adapter) at that step are kept.
4. Score: 32 samples per held-out class (guidance 4, temperature 0.8, top-k 50, 2 seeds) classified by
   argen's bundled 10-way demo classifier; accuracy = the share classified as their own category.
   Reported per run and step, with trainable parameters, file sizes, the median training step time and
   the peak resident memory of each training process. `--jobs` training processes run at a time, one
   thread each (the pretraining alone, on `--jobs` threads). Every stage reuses what an earlier run of
   the script left in WORK.

Writes WORK/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHILD = ("import json, resource, sys\nfrom argen.cli.main import main\ncode = main(sys.argv[1:])\n"
         "print(json.dumps({'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), file=sys.stderr)\n"
         "sys.exit(code)\n")
COMMON = ["--batch-size", "32", "--dropout", "0.05", "--token-dropout", "0.05", "--class-dropout", "0.1",
          "--schedule", "constant", "--seed", "0", "--no-tensorboard", "--no-progress", "--log-every", "10",
          "--ckpt-every", "100000", "--device", "cpu", "--precision", "fp32"]
SAMPLING = {"cfg_scale": 4.0, "temperature": 0.8, "top_k": 50}


def make_codes(work: Path, holdout: list[str]) -> tuple[Path, Path, list[int], list[int]]:
    import numpy as np

    from argen.checkpoint import load_tokenizer
    from argen.data.codes import CodeDataset, CodeShardWriter
    from argen.data.datasets import DemoDataset
    from argen.data.extract import extract_codes
    from argen.training.demo import DEMO_TOKENIZER

    data = DemoDataset(split="train")
    names = data.class_names
    missing = [h for h in holdout if h not in names]
    if missing:
        sys.exit(f"unknown categories {missing}; the demo's: {names}")
    new_ids = [names.index(h) for h in holdout]
    pre_ids = [i for i in range(len(names)) if i not in new_ids]
    full = work / "codes-all"
    if not (full / "index.json").is_file():
        extract_codes(load_tokenizer(str(DEMO_TOKENIZER)), data, full, image_size=64, flip=True, shard_size=4096)
    ds = CodeDataset(full)
    out = []
    for tag, ids in (("pre", pre_ids), ("new", new_ids)):
        root = work / f"codes-{tag}"
        if not (root / "index.json").is_file():
            labels = ds.labels.numpy() if hasattr(ds.labels, "numpy") else np.asarray(ds.labels)
            keep = np.nonzero(np.isin(labels, ids))[0]
            relabel = {old: new for new, old in enumerate(ids)}
            codes = np.stack([ds.get_batch(np.array([i]), np.array([a]))[0][0].numpy().reshape(ds.grid)
                              for i in keep for a in range(ds.num_augs)]).reshape(len(keep), ds.num_augs, *ds.grid)
            meta = {k: v for k, v in ds.meta.items() if k in ("kind", "codebook_size", "grid", "image_size",
                                                                "tokenizer", "tokenizer_sha256", "aug_names")}
            meta.update(num_augs=ds.num_augs, num_classes=len(ids), class_names=[names[i] for i in ids])
            writer = CodeShardWriter(root, meta)
            writer.write_shard(0, codes, np.array([relabel[int(x)] for x in labels[keep]]))
            writer.finalize()
        out.append(root)
    return out[0], out[1], pre_ids, new_ids


def train(argv: list[str], log: Path, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", CHILD, "train", *argv], env=env, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"train {' '.join(argv)} failed: {proc.stderr[-2000:]}")
    rss = [json.loads(line)["maxrss_kb"] for line in proc.stderr.splitlines() if line.startswith('{"maxrss_kb"')]
    return {"maxrss_mb": rss[-1] / 1024 if rss else None}


def staged_run(name: str, out: Path, argv: list[str], evals: list[int]) -> dict:
    """Train to each step in `evals` (resuming), keeping the weights or adapter at each."""
    peaks = out / "peak_rss_mb.json"
    for step in evals:
        keep = out / "evals" / f"step-{step:06d}"
        if keep.is_dir():
            continue
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        rss = train([*argv, "--out", str(out), "--max-steps", str(step), *resume], out / "train.log")["maxrss_mb"]
        known = json.loads(peaks.read_text()) if peaks.is_file() else {}
        peaks.write_text(json.dumps({**known, str(step): rss}))
        keep.mkdir(parents=True)
        for file in ("gpt.safetensors", "gpt.json", "adapter_config.json", "adapter_model.safetensors"):
            if (out / file).is_file():
                shutil.copy2(out / file, keep / file)
    values = [v for v in json.loads(peaks.read_text()).values() if v] if peaks.is_file() else []
    record = {"name": name, "peak_rss_mb": max(values) if values else None}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in logs if r["step"] > 10]
    record["step_ms"] = 1000 * 32 * 64 / statistics.median(rates) if rates else None
    return record


def score(work: Path, runs: dict, evals: list[int], new_ids: list[int], n: int, seeds: int) -> dict:
    import numpy as np
    import torch

    from argen.checkpoint import load_gpt, load_tokenizer
    from argen.evaluation.demo_classifier import load_demo_classifier, predict
    from argen.sampling.logits import SamplingParams
    from argen.training.demo import DEMO_TOKENIZER, sample_images

    torch.set_num_threads(2)
    tokenizer = load_tokenizer(str(DEMO_TOKENIZER))
    classifier, _ = load_demo_classifier(None)
    params = SamplingParams(**SAMPLING)
    labels = torch.arange(len(new_ids)).repeat_interleave(n)
    truth = np.array(new_ids)[labels.numpy()]
    table = {}
    for name, out in runs.items():
        for step in evals:
            folder = out / "evals" / f"step-{step:06d}"
            if (folder / "adapter_model.safetensors").is_file():
                gpt = load_gpt(str(work / "pretrain"), lora=str(folder))
            else:
                gpt = load_gpt(str(folder))
            hits = []
            for seed in range(seeds):
                images = sample_images(gpt, tokenizer, labels, None, params, 1000 + seed)
                hits.append(float((predict(classifier, images) == truth).mean()))
            table.setdefault(name, {})[step] = float(np.mean(hits))
            print(f"{name} step {step}: accuracy {table[name][step]:.3f}", flush=True)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-lora")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--evals", default="50,100,150,300,450")
    parser.add_argument("--holdout", default="Flags,Food & Drink")
    parser.add_argument("--ranks", default="4,8,16")
    parser.add_argument("--samples", type=int, default=32, help="samples per held-out class and seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    evals = sorted({int(x) for x in args.evals.split(",")} | {args.steps})
    start = time.time()
    pre, new, pre_ids, new_ids = make_codes(work, [h.strip() for h in args.holdout.split(",")])
    print(f"codes ready ({time.time() - start:.0f} s)", flush=True)
    pretrain = work / "pretrain"
    if not (pretrain / "gpt.safetensors").is_file():
        train(["--codes", str(pre), "--config", "GPT-demo", "--lr", "8e-3", "--warmup", "200", *COMMON,
               "--out", str(pretrain), "--max-steps", str(args.pretrain_steps)], pretrain / "train.log",
              threads=args.jobs)
    print(f"pretrained ({time.time() - start:.0f} s)", flush=True)
    specs = {"scratch": ["--config", "GPT-demo", "--lr", "8e-3", "--warmup", "200"],
             "full": ["--init-from", str(pretrain), "--lr", "2e-3", "--warmup", "50"]}
    for rank in [int(r) for r in args.ranks.split(",")]:
        specs[f"lora-r{rank}"] = ["--init-from", str(pretrain), "--lora-rank", str(rank), "--lr", "8e-3",
                                  "--warmup", "50"]
    runs = {name: work / name for name in specs}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {name: pool.submit(staged_run, name, runs[name], ["--codes", str(new), *argv, *COMMON], evals)
                   for name, argv in specs.items()}
        records = {name: f.result() for name, f in futures.items()}
    print(f"trained ({time.time() - start:.0f} s)", flush=True)
    accuracy = score(work, runs, evals, new_ids, args.samples, args.seeds)
    from safetensors.torch import load_file

    for name, out in runs.items():
        last = out / "evals" / f"step-{args.steps:06d}"
        file = last / ("adapter_model.safetensors" if name.startswith("lora") else "gpt.safetensors")
        tensors = load_file(str(file))
        records[name].update(file_bytes=file.stat().st_size, trainable=sum(
            t.numel() for k, t in tensors.items()) if name.startswith("lora") else sum(t.numel() for t in
                                                                                    tensors.values()),
            accuracy=accuracy[name])
    results = {"date": time.strftime("%Y-%m-%d"), "args": vars(args), "holdout": args.holdout, "evals": evals,
               "runs": records, "seconds": time.time() - start}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| run | trainable | file | step (ms) | peak RSS (MB) | " + " | ".join(f"acc@{s}" for s in evals) + " |")
    print("|---|---|---|---|---|" + "---|" * len(evals))
    for name, r in records.items():
        accs = " | ".join(f"{r['accuracy'][s]:.3f}" for s in evals)
        print(f"| {name} | {r['trainable']:,} | {r['file_bytes'] / 1e6:.2f} MB | {r['step_ms']:.0f} | "
              f"{r['peak_rss_mb'] or 0:.0f} | {accs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
