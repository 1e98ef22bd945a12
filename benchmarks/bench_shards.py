"""extract-codes from WebDataset tar shards vs the same images as a class folder (CPU, demo images).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_shards.py [--images 2000] [--per-shard 250] [--workers 0]

Writes the first N demo train images as JPEG (quality 95) into a class folder and into tar shards
(key.jpg + key.cls, same order), extracts codes with a randomly initialised VQ-demo tokenizer at 64 px
with --flip from both, checks that the codes are identical, and prints the times, images/s and the time
of the header scan behind the shards' random-access view (`len(ShardDataset)`).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from argen.data.datasets import ClassFolderDataset, DemoDataset
from argen.data.extract import extract_codes
from argen.data.shards import ShardDataset
from argen.models.tokenizer import VQModel, vq_config


def build(root: Path, count: int, per_shard: int) -> tuple[Path, str]:
    demo = DemoDataset("train")
    folder = root / "folder"
    records = []
    for i in range(count):
        buffer = io.BytesIO()
        demo.load(i).save(buffer, "JPEG", quality=95)
        label = demo.label(i)
        path = folder / f"c{label:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        records.append((path, label))
    records.sort(key=lambda r: (r[0].parent.name, r[0].name))  # the class folder's order
    shards = root / "shards"
    shards.mkdir()
    for s in range(0, count, per_shard):
        with tarfile.open(shards / f"{s // per_shard:05d}.tar", "w") as tar:
            for path, label in records[s:s + per_shard]:
                for name, data in ((f"{path.stem}.jpg", path.read_bytes()), (f"{path.stem}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = (count - 1) // per_shard
    return folder, f"{shards}/{{00000..{last:05d}}}.tar"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = VQModel(vq_config("VQ-demo")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, pattern = build(root, args.images, args.per_shard)
        results = {}
        for name, dataset in (("folder", ClassFolderDataset(folder)), ("shards", ShardDataset(pattern))):
            start = time.perf_counter()
            index = extract_codes(model, dataset, root / f"codes-{name}", 64, flip=True, shard_size=args.per_shard,
                                  num_workers=args.workers, progress=False)
            seconds = time.perf_counter() - start
            results[name] = {"seconds": round(seconds, 2), "images_per_s": round(index["num_images"] / seconds, 1)}
        same = all(np.array_equal(np.load(p), np.load(root / "codes-shards" / p.name))
                   for p in sorted((root / "codes-folder").glob("*.npy")))
        start = time.perf_counter()
        count = len(ShardDataset(pattern))
        scan = time.perf_counter() - start
        print(json.dumps({"images": args.images, "per_shard": args.per_shard, "workers": args.workers, **results,
                          "codes_identical": same, "index_scan_s": round(scan, 3), "indexed_samples": count},
                         indent=2))


if __name__ == "__main__":
    main()
