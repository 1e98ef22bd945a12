"""LPIPS perceptual distance (VGG16 trunk + the `lpips` package's learned linear heads), frozen.

Contract:
- `LPIPS(vgg_weights, lin_weights)`: `forward(a, b)` with (B, 3, H, W) images in [-1, 1] -> (B,) distances;
  gradients flow to the inputs, never to the parameters (all frozen, always in eval mode).
- Trunk: the 31-layer `features` part of torchvision's VGG16, module indices as in torchvision, so a file
  saved from `torchvision.models.vgg16().state_dict()` (keys `features.N.weight/bias`; classifier keys are
  ignored) loads directly. `vgg_weights` is a local path, "download" (torchvision's IMAGENET1K_V1 file via
  torch.hub's cache, needs network once), or None for a random trunk (tests only).
- Heads: `lin0..lin4` 1x1 convs from the `lpips` package (v0.1); `lin_weights` None loads the weights shipped
  inside the package (no network), or a path to a file with the same keys.
- `resolve_vgg_weights("auto")` returns the torch.hub cached VGG16 file when present, else None.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from argen.utils.errors import ArgenError
from argen.utils.torch_utils import load_torch_file

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
# trunk layer index after which each of the five LPIPS feature maps is taken (relu1_2 ... relu5_3)
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)


def _hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def resolve_vgg_weights(spec: str | os.PathLike | None) -> str | None:
    """"auto" -> cached torchvision file or None; "none" -> None; anything else is returned as is."""
    if spec is None or str(spec).lower() == "none":
        return None
    if str(spec).lower() == "auto":
        return str(_hub_file()) if _hub_file().is_file() else None
    return str(spec)


def read_weights(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArgenError(f"{what} file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return load_torch_file(path, what=f"{what} file")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ArgenError(f"cannot read {what} file {path} ({exc})") from exc


def vgg16_trunk() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])


class LPIPS(nn.Module):
    def __init__(self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None):
        super().__init__()
        import lpips as lpips_package

        self.scaling = lpips_package.ScalingLayer()
        self.trunk = vgg16_trunk()
        self.lins = nn.ModuleList([lpips_package.NetLinLayer(c, use_dropout=True) for c in CHANNELS])
        if vgg_weights is not None:
            self.load_trunk(vgg_weights)
        if lin_weights is None:
            lin_weights = Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        self.load_heads(lin_weights)
        self.requires_grad_(False)
        self.eval()

    def load_trunk(self, spec: str | os.PathLike) -> None:
        if str(spec) == "download":
            try:
                state = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False)
            except OSError as exc:
                raise ArgenError(f"cannot download the VGG16 weights ({exc}); pass a local file instead") from exc
        else:
            state = read_weights(spec, "VGG16 weights")
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        expected = self.trunk.state_dict()
        if set(features) != set(expected) or any(features[k].shape != expected[k].shape for k in expected):
            raise ArgenError(f"{spec} is not a torchvision VGG16 state dict (expected keys features.N.weight/bias)")
        self.trunk.load_state_dict(features)

    def load_heads(self, path: str | os.PathLike) -> None:
        state = read_weights(path, "LPIPS linear-head weights")
        heads = {}
        for i in range(len(CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise ArgenError(f"{path} lacks {key}; it is not an lpips v0.1 VGG head file")
            heads[f"{i}.model.1.weight"] = state[key]
        self.lins.load_state_dict(heads)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = self.scaling(torch.cat([a, b]).float())  # (2B, 3, H, W)
        total = x.new_zeros(a.shape[0])
        tap = 0
        for index, layer in enumerate(self.trunk):
            x = layer(x)
            if index == TAPS[tap]:
                fa, fb = x.chunk(2)
                fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((fa - fb) ** 2).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(TAPS):
                    break
        return total  # (B,)
