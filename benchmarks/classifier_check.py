"""The bundled classifier's scores of two samplers on the same seeds: is a variant within 1 s.e.?

`paired_scores(gpt, samplers, seeds, per_item)`: `samplers` maps a name to `fn(cond, mask, params,
generator) -> (B, N) codes`; the first name is the baseline. For each seed every sampler draws
`per_item` images of each class (c2i) or demo prompt (t2i) at the model's own sampling settings from
`torch.Generator().manual_seed(seed)`; the images are scored by `training.demo.DemoScorer` (the demo
report's score: class accuracy for c2i, prompt match for t2i). Prints a line per seed and the mean
difference of each variant from the baseline with the standard error of the per-seed differences;
returns the per-seed rows.
"""

from __future__ import annotations

import numpy as np
import torch

from argen.sampling.logits import SamplingParams


def conditions(gpt, per_item: int):
    """Each class (c2i) or demo prompt (t2i), `per_item` times: (cond, mask or None, labels)."""
    if gpt.config.kind == "c2i":
        labels = np.repeat(np.arange(gpt.config.num_classes), per_item)
        return torch.from_numpy(labels), None, labels
    from argen.data.text_encoders import load_text_encoder
    from argen.training.demo import PROMPTS

    feats, mask = load_text_encoder("minilm").encode(PROMPTS, gpt.config.caption_len)
    labels = np.repeat(np.arange(len(PROMPTS)), per_item)
    return feats.repeat_interleave(per_item, dim=0), mask.repeat_interleave(per_item, dim=0), labels


def paired_scores(gpt, samplers: dict, seeds: list[int], per_item: int = 8) -> list[dict]:
    from argen import load_tokenizer
    from argen.data.datasets import DemoDataset
    from argen.engine import decode_codes
    from argen.training.demo import DemoScorer

    tokenizer = load_tokenizer("demo-vq")
    scorer = DemoScorer(DemoDataset("train"))
    kind = gpt.config.kind
    cond, mask, labels = conditions(gpt, per_item)
    params = SamplingParams.for_model(gpt)
    names = list(samplers)
    rows = []
    for seed in seeds:
        row = {"seed": seed}
        for name, fn in samplers.items():
            images = decode_codes(tokenizer, fn(cond, mask, params, torch.Generator().manual_seed(seed)))
            score = scorer.c2i(images, labels)["accuracy"] if kind == "c2i" else scorer.t2i(images, labels)["match"]
            row[name] = round(float(score), 4)
        rows.append(row)
        print(f"  seed {seed}: " + ", ".join(f"{n} {row[n]:.1%}" for n in names), flush=True)
    what = "classifier accuracy" if kind == "c2i" else "prompt match"
    for name in names[1:]:
        diff = np.array([r[name] - r[names[0]] for r in rows])
        se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        print(f"{kind} {what} over {len(seeds)} seeds x {len(cond)} images: {names[0]} "
              f"{np.mean([r[names[0]] for r in rows]):.1%}, {name} {np.mean([r[name] for r in rows]):.1%}, "
              f"difference {diff.mean():+.1%} +- {se:.1%} (s.e.): "
              f"{'within' if abs(diff.mean()) <= se else 'NOT within'} 1 s.e.", flush=True)
    return rows
