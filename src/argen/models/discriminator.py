"""PatchGAN discriminator (pix2pix/taming layout) for VQ tokenizer training.

Contract: `PatchGANDiscriminator(in_channels=3, base_channels=64, num_layers=3)`; `forward(images)` with
(B, 3, H, W) images in [-1, 1] -> (B, 1, h, w) real/fake logits, one per overlapping patch
(h = H / 2**num_layers - 2 for H >= 2**(num_layers+1)). 4x4 convolutions: stride 2 for the first
`num_layers`, then stride 1; BatchNorm after every conv but the first and last; LeakyReLU(0.2).
Weights start from N(0, 0.02) (convs) and N(1, 0.02) (norm scales), as in the original PatchGAN.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchGANDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(base_channels * mult), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.02, generator=generator)
                module.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)  # (B, 1, h, w)
