"""Score generators on the demo set the way `argen demo`'s report does, over sampling settings.

    python benchmarks/bench_bundled.py                                  # the bundled demo-c2i / demo-t2i
    python benchmarks/bench_bundled.py --c2i runs/bundled/gpt-c2i --t2i runs/bundled/gpt-t2i \\
        --settings 3.0,0.8,50 2.0,1.0,0 4.0,0.8,50                      # cfg,temperature,top-k per setting

For each setting: the bundled classifier's accuracy on c2i samples (8 per class, seeds 0, 2, 4) and
its ratio to the accuracy on the real validation images, and the t2i prompt match on the report's 8
prompts (seeds 1, 3, 5), as `argen.training.demo.score_generators` computes them. Prints one JSON
line per setting. With no --settings, each generator's own recommended settings are used.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from argen.checkpoint import load_gpt, load_tokenizer
from argen.data.datasets import DemoDataset
from argen.sampling.logits import SamplingParams
from argen.training.demo import DemoScorer, score_generators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c2i", default="demo-c2i")
    parser.add_argument("--t2i", default="demo-t2i")
    parser.add_argument("--tokenizer", default="demo-vq")
    parser.add_argument("--settings", nargs="*", default=[], help="cfg,temperature,top_k triples")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cpu")
    train_set, val_set = DemoDataset("train"), DemoDataset("val")
    scorer = DemoScorer(train_set)
    real = scorer.real(val_set.images, val_set.labels)["accuracy"]
    c2i, t2i = load_gpt(args.c2i), load_gpt(args.t2i)
    tokenizer = load_tokenizer(args.tokenizer)
    settings = [tuple(float(x) for x in s.split(",")) for s in args.settings] or [None]
    for setting in settings:
        if setting is None:
            params = {"c2i": SamplingParams.for_model(c2i), "t2i": SamplingParams.for_model(t2i)}
        else:
            cfg, temperature, top_k = setting
            params = dict.fromkeys(("c2i", "t2i"), SamplingParams(cfg_scale=cfg, temperature=temperature,
                                                                  top_k=int(top_k)))
        t0 = time.perf_counter()
        result = score_generators(c2i, t2i, tokenizer, scorer, args.per_class, args.seed, params, device)
        print(json.dumps({
            "c2i": args.c2i, "t2i": args.t2i, "sampling": {k: v.to_dict() for k, v in params.items()},
            "real_val_accuracy": round(real, 3),
            "c2i_accuracy": round(result["c2i"]["accuracy"], 3),
            "c2i_accuracy_seeds": [round(r["accuracy"], 3) for r in result["c2i_runs"]],
            "c2i_ratio": round(result["c2i"]["accuracy"] / real, 3),
            "c2i_per_class": [round(a, 2) for a in result["c2i"]["per_class"]],
            "t2i_match": round(result["t2i"]["match"], 3),
            "t2i_match_seeds": [round(r["match"], 3) for r in result["t2i_runs"]],
            "t2i_per_prompt": [round(a, 2) for a in result["t2i"]["per_prompt"]],
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
