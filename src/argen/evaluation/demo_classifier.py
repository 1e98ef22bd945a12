"""The demo's shape-aware score: a small classifier over the emoji categories, shipped with argen.

Contract:
- `DEMO_CLASSIFIER` is the package file `evaluation/data/demo_classifier.safetensors` (+ .json with the
  class names, its validation accuracy and how it was made). `python scripts/train_demo_classifier.py`
  remakes it by calling `train_demo_classifier`; its only inputs are the seed and the dataset.
- `train_demo_classifier(epochs, seed)` trains `models.classifier.ImageClassifier` on the demo's training
  split (category labels) with flips, shifts on white and Gaussian blur (generated images pass through
  the tokenizer's decoder, which blurs), and reports its accuracy on the validation split.
- `load_demo_classifier(path=None)` loads it strictly; `predict` and `embed` take (B, H, W, 3) uint8 images
  and run in batches: labels (B,), or unit-length pooled features (B, F).
- `accuracy(pred, labels, num_classes)` -> (overall, per-class; NaN for a class with no images);
  `nearest_centroid(feats, ref_feats, ref_ids)` gives each row the id of its most similar (cosine)
  reference centroid: the t2i prompt-match score is the share of samples given their own prompt.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from argen.checkpoint import load_classifier
from argen.models.classifier import ClassifierConfig, ImageClassifier
from argen.utils.images import from_uint8

DEMO_CLASSIFIER = Path(str(resources.files("argen.evaluation") / "data" / "demo_classifier.safetensors"))
SHIFT = 6  # pixels of white padding a training image may shift by
BATCH = 256  # images per forward at inference


def load_demo_classifier(path: str | Path | None = None, device=None) -> tuple[ImageClassifier, dict]:
    return load_classifier(path or DEMO_CLASSIFIER, device=device)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> flipped, shifted (white fill) and, for half the batch, blurred copies."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (SHIFT,) * 4, value=1.0)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, b), generator=gen).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    sigma = 0.3 + 1.2 * float(torch.rand((), generator=gen))
    half = b // 2
    return torch.cat([gaussian_blur(x[:half], kernel_size=[5, 5], sigma=[sigma, sigma]), x[half:]])


def train_demo_classifier(epochs: int = 30, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                          cfg: ClassifierConfig | None = None, train_limit: int | None = None,
                          progress: bool = True) -> tuple[ImageClassifier, dict]:
    """Train on the demo's training split; returns (model in eval mode, info with the validation accuracy)."""
    from argen.data.datasets import DemoDataset

    torch.manual_seed(seed)
    train_set, val_set = DemoDataset("train"), DemoDataset("val")
    if train_limit:
        train_set = train_set.subset(train_limit)
    cfg = cfg or ClassifierConfig(num_classes=len(train_set.class_names))
    model = ImageClassifier(cfg).to(memory_format=torch.channels_last)
    images, labels = from_uint8(train_set.images), torch.from_numpy(train_set.labels)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="train classifier", disable=not progress)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = _augment(images[idx], gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    val_acc, per_class = accuracy(predict(model, val_set.images), val_set.labels, cfg.num_classes)
    info = {"class_names": train_set.class_names, "labels": "category", "val_accuracy": round(val_acc, 4),
            "val_accuracy_per_class": [None if math.isnan(a) else round(a, 4) for a in per_class],
            "train_images": len(train_set), "val_images": len(val_set),
            "training": {"epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
                         "augment": f"hflip, shift <= {SHIFT} px on white, blur sigma 0.3-1.5 on half"}}
    return model, info


@torch.no_grad()
def _batched(fn, model: ImageClassifier, images: np.ndarray) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [fn(from_uint8(images[i:i + BATCH]).to(device)) for i in range(0, len(images), BATCH)]
    return torch.cat(outs).cpu() if outs else torch.zeros(0)


def predict(model: ImageClassifier, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B,) predicted class ids."""
    return _batched(lambda x: model(x).argmax(-1), model, images).numpy().astype(np.int64)


def embed(model: ImageClassifier, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, F) unit-length pooled features."""
    return F.normalize(_batched(model.features, model, images).float(), dim=-1).numpy()


def accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Overall share of correct predictions, and the share per class (NaN where a class has no rows)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    per_class = [float((pred[labels == c] == c).mean()) if (labels == c).any() else float("nan")
                 for c in range(num_classes)]
    return float((pred == labels).mean()), per_class


def nearest_centroid(feats: np.ndarray, ref_feats: np.ndarray, ref_ids: np.ndarray) -> np.ndarray:
    """(B, F) unit features -> (B,) the id whose reference centroid is most similar (cosine) to each row."""
    ref_ids = np.asarray(ref_ids)
    keys = np.unique(ref_ids)
    centroids = np.stack([ref_feats[ref_ids == k].mean(0) for k in keys])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return keys[(feats @ centroids.T).argmax(1)]
