"""Vector quantizer with an L2-normalised codebook (cosine-distance nearest neighbour).

`quantize(z)` maps (B, C, h, w) latents to codes (B, h, w) and straight-through quantized latents.
Training losses: codebook loss ||sg(z) - e||^2, commitment beta * ||z - sg(e)||^2, and an optional
entropy loss that rewards confident per-sample and diverse average code assignment.
`codebook_used` is a rolling window of the last 65,536 codes (a buffer, saved with the weights).
Codebook rows are gathered with `F.embedding`, whose CPU backward sums repeated codes in a fixed order
(indexing `codebook[codes]` backpropagates through a multi-threaded atomic add on the CPU, so two
identical training runs would differ in the last bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

USAGE_WINDOW = 65536


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, h, w), straight-through
    codes: torch.Tensor  # (B, h, w) int64
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    usage: float  # fraction of the codebook seen in the rolling window


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus entropy of the batch-average assignment; affinity is (N, K)."""
    logits = affinity / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - batch_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25, entropy_weight: float = 0.0,
                 l2_norm: bool = True):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def nearest(self, flat: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (codes (N,), negative squared distance (N, K)) for flat (N, C)."""
        dist = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                - 2 * flat @ codebook.t())  # (N, K)
        return dist.argmin(dim=1), -dist

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> latents (B, C, h, w)."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def _track_usage(self, codes: torch.Tensor) -> float:
        flat = codes.flatten().to(self.codebook_used.dtype)[-USAGE_WINDOW:]
        n = flat.numel()
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], flat]))
        seen = self.codebook_used[self.codebook_used >= 0]
        return torch.unique(seen).numel() / self.codebook_size

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        batch, channels, height, width = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        flat = z.reshape(-1, channels)
        codes, affinity = self.nearest(flat, codebook)
        z_q = F.embedding(codes, codebook).view_as(z)
        zero = z.new_zeros(())
        if self.training:
            codebook_loss = torch.mean((z_q - z.detach()) ** 2)
            commitment_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            ent = self.entropy_weight * entropy_loss(affinity) if self.entropy_weight > 0 else zero
            with torch.no_grad():
                usage = self._track_usage(codes)
        else:
            codebook_loss = commitment_loss = ent = zero
            usage = 0.0
        z_q = z + (z_q - z).detach()
        return QuantizerOutput(
            quantized=z_q.permute(0, 3, 1, 2).contiguous(),
            codes=codes.view(batch, height, width),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            entropy_loss=ent,
            usage=usage,
        )
