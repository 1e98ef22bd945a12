"""The gpu check's first command: versions, then every module a stage needs, imported in seconds.

    python benchmarks/gpu_preflight.py [--stages engine,train,...]

Prints python, torch (CUDA, device) and the versions of the packages the stages use, says when torch
is older than argen's pin, then imports each stage's modules (argen's, the benchmarks', the gpu test
modules') and names every one that fails with its error. Exit 1 when a module a selected stage needs
is missing: the check then stops before any stage spends device time. Last, it tries the rest of
argen's modules and lists, without failing, those this machine cannot import (serving without
fastapi, say): no stage of the check needs them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import pkgutil
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# stage -> the modules it imports (its own script's imports and what it reaches at run time)
STAGES = {
    "engine": ["argen.engine", "argen.models.gpt", "argen.sampling", "argen.sampling.logits"],
    "reference": ["argen.models.gpt", "argen.sampling", "torch._dynamo.utils"],
    "reference_xl": ["argen.models.gpt", "argen.sampling", "torch._dynamo.utils"],
    "pytest": ["pytest", "scipy.stats", "conftest", "test_engine", "test_inception", "test_jacobi",
               "test_jacobi_tree", "test_train_cuda"],
    "train": ["argen.data.codes", "argen.training.config", "argen.training.generator"],
    "sample": ["argen", "argen.models.gpt", "argen.models.tokenizer", "argen.cli.main", "argen.cli.sample_batch",
               "argen.cli.evaluate", "argen.data.caption_files", "argen.evaluation.sample_batch",
               "argen.evaluation.evaluate", "argen.models.inception", "argen.checkpoint.hub",
               "argen.utils.dist_env", "argen.utils.io", "argen.utils.torch_utils", "scipy.linalg"],
    "slots": ["argen.engine", "argen.engine.slots", "argen.engine.jacobi", "argen.sampling"],
    "jacobi": ["argen", "argen.checkpoint", "argen.engine", "argen.engine.jacobi", "argen.engine.draft_tree",
               "argen.sampling"],
    "int8": ["argen.checkpoint", "argen.engine", "argen.models.gpt", "argen.nn.quant", "argen.sampling",
             "argen.sampling.logits"],
}
PACKAGES = ["numpy", "scipy", "safetensors", "pillow", "tqdm", "transformers", "huggingface_hub", "torchvision",
            "triton", "pytest", "pytest-timeout"]


def _pin(name: str) -> str | None:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(name)}==([^"]+)"', text)
    return match.group(1) if match else None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def versions() -> None:
    import torch

    cuda = torch.cuda.is_available()
    print(f"python {sys.version.split()[0]} ({sys.executable}) | torch {torch.__version__} | CUDA {torch.version.cuda}"
          f" | available {cuda} | {torch.cuda.get_device_name(0) if cuda else '-'}")
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} MISSING")
    print(" | ".join(found))
    pin = _pin("torch")
    if pin and _release(torch.__version__) < _release(pin):
        print(f"NOTE: torch {torch.__version__} is older than argen's pin {pin}: figures are for this torch; "
              f"a stage that fails on an API only the pin has is a version gap, not a GPU bug")


def check(stages: list[str]) -> int:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    wanted: dict[str, list[str]] = {}
    for stage in stages:
        for module in STAGES.get(stage, []):
            wanted.setdefault(module, []).append(stage)
    failed = 0
    t0 = time.perf_counter()
    for module, users in wanted.items():
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - report every missing piece, not the first
            failed += 1
            print(f"MISSING for {','.join(users)}: {module}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=-3)
    print(f"imported {len(wanted) - failed}/{len(wanted)} modules the stages need in "
          f"{time.perf_counter() - t0:.1f} s")
    import argen

    unused = []
    for info in pkgutil.walk_packages(argen.__path__, "argen."):
        if info.name in sys.modules:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001
            unused.append(f"{info.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
    if unused:
        print("not importable here, needed by no stage of the check:\n  " + "\n  ".join(unused))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (default: all)")
    args = parser.parse_args(argv)
    versions()
    return check([s for s in args.stages.split(",") if s])


if __name__ == "__main__":
    sys.exit(main())
