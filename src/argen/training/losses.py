"""Losses for VQ tokenizer training (LlamaGen/VQGAN recipe).

Contract:
- `hinge_d_loss(real, fake)`: mean(relu(1 - real)) / 2 + mean(relu(1 + fake)) / 2 on logits.
- `hinge_g_loss(fake)`: -mean(fake).
- `adopt_weight(step, start)`: 0 before `start`, 1 from then on (the discriminator's warm-up gate).
- `adaptive_weight(nll, g_loss, last_layer)`: VQGAN's ||grad nll|| / ||grad g_loss|| at the decoder's last
  layer, clamped to [0, 1e4]; optional (LlamaGen's default is a fixed weight).
- `psnr(a, b)`: per-image PSNR in dB for (B, 3, H, W) images in [-1, 1] (values clamped to that range),
  by `argen.evaluation.recon_metrics.psnr` with peak 1 on the [0, 1] scale.
- `TokenizerLoss`: generator-side total = reconstruction (L2 or L1) + perceptual (LPIPS) + codebook +
  commitment + entropy + disc_weight * gate * adversarial; discriminator side = gate * hinge loss.
  Returns the total and a dict of float logs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from argen.evaluation.recon_metrics import psnr as metrics_psnr


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adopt_weight(step: int, start: int) -> float:
    return 1.0 if step >= start else 0.0


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B,) PSNR in dB with peak 1 on the [0, 1] scale (`recon_metrics.psnr`)."""
    a = (a.detach().float().clamp(-1, 1) + 1) / 2
    b = (b.detach().float().clamp(-1, 1) + 1) / 2
    return torch.from_numpy(metrics_psnr(a, b, peak=1.0)).float()


class TokenizerLoss:
    def __init__(self, perceptual=None, discriminator=None, reconstruction: str = "l2",
                 reconstruction_weight: float = 1.0, perceptual_weight: float = 1.0, codebook_weight: float = 1.0,
                 disc_weight: float = 0.5, disc_start: int = 20000, adaptive: bool = False):
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction loss must be l1 or l2, got {reconstruction!r}")
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.adaptive = adaptive

    def generator(self, images: torch.Tensor, out, step: int, last_layer: torch.Tensor | None = None):
        recon = out.reconstruction.float()
        target = images.float()
        if self.reconstruction == "l2":
            rec = F.mse_loss(recon, target)
        else:
            rec = F.l1_loss(recon, target)
        zero = recon.new_zeros(())
        perc = self.perceptual(recon, target).mean() if self.perceptual is not None and self.perceptual_weight else zero
        nll = self.reconstruction_weight * rec + self.perceptual_weight * perc
        vq = out.codebook_loss + out.commitment_loss + out.entropy_loss
        gate = adopt_weight(step, self.disc_start) if self.discriminator is not None else 0.0
        adv = zero
        weight = torch.tensor(self.disc_weight)
        if gate:
            adv = hinge_g_loss(self.discriminator(out.reconstruction).float())
            if self.adaptive and last_layer is not None:
                weight = adaptive_weight(nll, adv, last_layer) * self.disc_weight
        total = nll + self.codebook_weight * vq + gate * weight * adv
        logs = {k: float(v.detach()) for k, v in (("loss", total), ("rec_loss", rec), ("perceptual_loss", perc),
                                                   ("codebook_loss", out.codebook_loss),
                                                   ("commit_loss", out.commitment_loss),
                                                   ("entropy_loss", out.entropy_loss), ("g_adv_loss", adv))}
        logs["disc_gate"] = gate
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int):
        gate = adopt_weight(step, self.disc_start)
        real = self.discriminator(images.detach())
        fake = self.discriminator(reconstruction.detach())
        loss = gate * hinge_d_loss(real.float(), fake.float())
        return loss, {"d_loss": float(loss.detach()), "logits_real": float(real.detach().float().mean()),
                      "logits_fake": float(fake.detach().float().mean())}
