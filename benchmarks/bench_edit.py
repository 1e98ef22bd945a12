"""Editing quality and cost on the demo set: regenerate part of each validation image and score it.

    python benchmarks/bench_edit.py                      # demo-c2i + demo-vq, all 380 validation images
    python benchmarks/bench_edit.py --limit 64 --seed 1  # a quicker look

For the 380 validation emoji, each edit keeps the image's tokens outside a region and regenerates the
region under the image's own class (`argen.edit`, the generator's recommended settings, image i seeded
with image_seed(seed, i)). Regions: the bottom half (32 of 64 tokens), the right half (32) and a centre
box of a quarter of the tokens (16). Reported per region, as one JSON line each:
- accuracy: the bundled demo classifier's accuracy on the edits, on the originals, on the tokenizer's round
  trips, and on free samples of the same classes (same seeds), and the ratio edits / originals
  (target: >= 0.9 with at most a quarter of the tokens regenerated);
- kept_tokens_changed: kept tokens that differ from the tokenizer's codes of the input (must be 0);
- psnr_kept: PSNR (dB) of the kept pixels against the originals, for the edits and for the round trips
  (kept tokens are exact, so the edits must match the round trip's figure up to the decoder's reach
  across the seam), and PSNR of the edits' kept pixels against the round trips;
- seam: mean absolute step (0-255) between the two pixel lines either side of the region's border,
  for the edits, the round trips and the originals (a visible seam shows as a larger step);
- forward passes per image, as the engine counts them (`BatchResult.forwards`: its prefill, each decode
  step it took part in, and one extend per run of kept tokens that a regenerated token follows), for
  the edits and for free samples; and the model calls of all batches (a decode step serves every slot
  in one call, while each slot's kept run is its own call).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import argen
from argen.checkpoint import load_gpt, load_tokenizer
from argen.data.datasets import DemoDataset
from argen.editing import edit, encode_images
from argen.engine import decode_codes, engine_for
from argen.evaluation.demo_classifier import accuracy, load_demo_classifier, predict
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed

BATCH = 64


def regions(grid: int) -> dict[str, tuple[slice, slice]]:
    """Token regions to regenerate: (rows, columns) of the token grid."""
    half, quarter = grid // 2, grid // 4
    return {"bottom_half": (slice(half, grid), slice(0, grid)), "right_half": (slice(0, grid), slice(half, grid)),
            "centre_quarter": (slice(quarter, grid - quarter), slice(quarter, grid - quarter))}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def seam_step(images: np.ndarray, pixels: np.ndarray) -> float:
    """Mean |difference| between pixels just inside and just outside the region's border (4-neighbours)."""
    inside = pixels[None, ..., None]
    steps = []
    for axis in (1, 2):
        a, b = np.swapaxes(images, 1, axis), np.swapaxes(inside, 1, axis)
        border = b[:, 1:] != b[:, :-1]  # (.., H-1, W, 1): a pair across the border
        diff = np.abs(a[:, 1:].astype(np.float64) - a[:, :-1].astype(np.float64))
        steps.append(diff[np.broadcast_to(border, diff.shape)])
    return float(np.concatenate(steps).mean())


class ForwardCounter:
    """Forward passes from the engine's own counts: per image (prefill, steps, extends of kept runs, as
    `BatchResult.forwards` reports them) and model calls per batch (a step serves every slot at once)."""

    def __init__(self, gpt):
        self.per_image: list[float] = []
        self.calls = 0
        engine = engine_for(gpt)
        inner = engine.run

        def counted(*args, **kwargs):
            result = inner(*args, **kwargs)
            self.per_image.extend(result.forwards.tolist())
            self.calls += result.model_calls
            return result

        engine.run = counted

    def take(self) -> tuple[float, int]:
        """Mean forward passes per image and model calls since the last take."""
        per_image, calls = float(np.mean(self.per_image)), self.calls
        self.per_image, self.calls = [], 0
        return per_image, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt", default="demo-c2i")
    parser.add_argument("--tokenizer", default="demo-vq")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT validation images")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    data = DemoDataset("val")
    images, labels = data.images[:args.limit], data.labels[:args.limit]
    gpt, tokenizer = load_gpt(args.gpt), load_tokenizer(args.tokenizer)
    classifier, _ = load_demo_classifier()
    classes = len(data.class_names)
    params = SamplingParams.for_model(gpt)
    grid, p = gpt.config.grid_size, gpt.config.downsample
    counter = ForwardCounter(gpt)
    count = len(images)
    seeds = [image_seed(args.seed, i) for i in range(count)]

    codes = encode_images(tokenizer, images)  # (B, g, g)
    trips = decode_codes(tokenizer, codes)
    free = []
    for start in tqdm(range(0, count, BATCH), desc="free samples"):
        stop = min(count, start + BATCH)
        tokens = argen.generate(gpt, torch.as_tensor(labels[start:stop]), params=params,
                                row_generators=[torch.Generator().manual_seed(s) for s in seeds[start:stop]])
        free.append(decode_codes(tokenizer, tokens.view(-1, grid, grid)))
    free = np.concatenate(free)
    free_per_image, free_calls = counter.take()
    base = {"images": count, "gpt": args.gpt, "seed": args.seed, "sampling": params.to_dict(),
            "accuracy_originals": round(accuracy(predict(classifier, images), labels, classes)[0], 4),
            "accuracy_round_trip": round(accuracy(predict(classifier, trips), labels, classes)[0], 4),
            "accuracy_free_samples": round(accuracy(predict(classifier, free), labels, classes)[0], 4),
            "forwards_per_free_sample": free_per_image, "model_calls_free_samples": free_calls}
    for name, (rows, cols) in regions(grid).items():
        started = time.perf_counter()
        token_mask = torch.zeros(grid, grid, dtype=torch.bool)
        token_mask[rows, cols] = True
        pixels = token_mask.repeat_interleave(p, 0).repeat_interleave(p, 1).numpy()  # (S, S) True = edited
        edited, edit_codes = [], []
        for start in tqdm(range(0, count, BATCH), desc=name):
            stop = min(count, start + BATCH)
            result = edit(gpt, tokenizer, images[start:stop], pixels, torch.as_tensor(labels[start:stop]),
                          params=params, row_generators=[torch.Generator().manual_seed(s) for s in seeds[start:stop]])
            edited.append(result.images)
            edit_codes.append(result.codes)
        edited, edit_codes = np.concatenate(edited), torch.cat(edit_codes)
        per_image, calls = counter.take()
        kept = ~token_mask.flatten()
        changed = int((edit_codes[:, kept] != codes.flatten(1)[:, kept]).sum())
        keep_px = ~pixels
        acc = accuracy(predict(classifier, edited), labels, classes)[0]
        runs = int((kept[1:] & ~kept[:-1]).sum() + kept[0])
        print(json.dumps({
            **base, "region": name, "regenerated_tokens": int(token_mask.sum()), "tokens": grid * grid,
            "kept_runs": runs, "accuracy_edits": round(acc, 4),
            "ratio_to_originals": round(acc / base["accuracy_originals"], 4),
            "kept_tokens_changed": changed,
            "psnr_kept_edits_vs_originals": round(psnr(edited[:, keep_px], images[:, keep_px]), 2),
            "psnr_kept_round_trip_vs_originals": round(psnr(trips[:, keep_px], images[:, keep_px]), 2),
            "psnr_kept_edits_vs_round_trip": round(psnr(edited[:, keep_px], trips[:, keep_px]), 2),
            "seam_edits": round(seam_step(edited, pixels), 2), "seam_round_trip": round(seam_step(trips, pixels), 2),
            "seam_originals": round(seam_step(images, pixels), 2),
            "forwards_per_edit": per_image, "model_calls_edits": calls,
            "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
