"""A small image classifier: the shape-aware score of `argen demo` (10 emoji categories at 64x64).

Contract:
- `ClassifierConfig` is the architecture alone (widths per stage, classes, image size); the classes and
  their names come from the data it was trained on and are stored beside the weights.
- `ImageClassifier(cfg)(x)` takes (B, 3, H, W) float images on the [-1, 1] scale (`utils.images.from_uint8`)
  and returns logits (B, num_classes); `features(x)` returns the pooled (B, widths[-1]) features the
  logits are a linear function of, which `argen demo` compares between samples and real images.
- Each stage is two 3x3 conv + batch-norm + ReLU units, then a 2x2 max-pool; the head is a global
  average pool, dropout and one linear layer. Batch-norm uses running statistics in eval mode, so an
  image's score does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int = 10
    widths: tuple[int, ...] = (24, 48, 96, 160)
    image_size: int = 64
    dropout: float = 0.2


def _unit(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ImageClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        layers, cin = [], 3
        for width in cfg.widths:
            layers += _unit(cin, width) + _unit(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.trunk = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cin, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, classes)
