"""Remake the classifier `argen demo` scores its samples with (argen/evaluation/data/demo_classifier.*).

Usage: python scripts/train_demo_classifier.py [--epochs 24] [--seed 0] [--out src/argen/evaluation/data]

Trains `argen.models.classifier.ImageClassifier` on the bundled emoji training split (10 category labels)
with `argen.evaluation.demo_classifier.train_demo_classifier`, prints its accuracy on the validation split,
and writes demo_classifier.safetensors + .json (class names, accuracies, settings, dataset checksum).
About 20 s an epoch on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from argen.checkpoint import save_classifier
from argen.data.datasets import DemoDataset
from argen.evaluation.demo_classifier import DEMO_CLASSIFIER, train_demo_classifier
from argen.utils.io import sha256_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEMO_CLASSIFIER.parent))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, info = train_demo_classifier(epochs=args.epochs, seed=args.seed)
    info["dataset_sha256"] = sha256_file(DemoDataset.default_path())
    info["made_by"] = f"scripts/train_demo_classifier.py --epochs {args.epochs} --seed {args.seed}"
    file = save_classifier(model, Path(args.out) / DEMO_CLASSIFIER.name, extra=info)
    print(f"validation accuracy {info['val_accuracy']:.1%} ({time.perf_counter() - started:.0f} s); wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
