"""LPIPS perceptual distance: the `lpips` package's `LPIPS` (VGG16, v0.1) with weights from local files, frozen.

Contract:
- `LPIPS(vgg_weights, lin_weights)`: `forward(a, b)` with (B, 3, H, W) images in [-1, 1] -> (B,) distances;
  gradients flow to the inputs, never to the parameters (all frozen, always in eval mode).
- The network is `lpips.LPIPS(net="vgg", version="0.1")` built with `pnet_rand=True, pretrained=False`, so
  building it downloads nothing; argen then loads the weights into it:
- Trunk: a file saved from `torchvision.models.vgg16().state_dict()` (keys `features.N.weight/bias`, module
  indices as in torchvision; classifier keys are ignored), mapped onto the package's five VGG slices.
  `vgg_weights` is a local path, "download" (torchvision's IMAGENET1K_V1 file via torch.hub's cache, needs
  network once, sha256 prefix checked), or None for a random trunk (tests only).
- Heads: `lin0..lin4` 1x1 convs (keys `linI.model.1.weight`); `lin_weights` None loads the v0.1 VGG heads
  shipped inside the `lpips` package (no network), or a path to a file with the same keys.
- Every file is read with `torch.load(weights_only=True)` (or safetensors); bad files are `ArgenError`s.
- `resolve_vgg_weights("auto")` returns the torch.hub cached VGG16 file when present, else None.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from argen.utils.errors import ArgenError
from argen.utils.torch_utils import load_torch_file

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"


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

            state = load_file(str(path))
        else:
            state = load_torch_file(path, what=f"{what} file")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ArgenError(f"cannot read {what} file {path} ({exc})") from exc
    if not isinstance(state, dict):
        raise ArgenError(f"{what} file {path} holds a {type(state).__name__}, not a state dict")
    return state


def vgg16_trunk() -> nn.Sequential:
    """torchvision's VGG16 `features` (31 modules): the key layout of the trunk files `LPIPS` loads."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])


def _package_heads() -> Path:
    import lpips as lpips_package

    return Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth"


class LPIPS(nn.Module):
    def __init__(self, vgg_weights: str | os.PathLike | None = None, lin_weights: str | os.PathLike | None = None):
        super().__init__()
        import lpips as lpips_package

        with warnings.catch_warnings():  # torchvision's deprecation note for the package's `pretrained=` call
            warnings.simplefilter("ignore")
            self.net = lpips_package.LPIPS(pretrained=False, net="vgg", version="0.1", pnet_rand=True,
                                           verbose=False)
        if vgg_weights is not None:
            self.load_trunk(vgg_weights)
        self.load_heads(_package_heads() if lin_weights is None else lin_weights)
        self.requires_grad_(False)
        self.eval()

    def _slices(self) -> list[nn.Sequential]:
        return [getattr(self.net.net, f"slice{i}") for i in range(1, self.net.net.N_slices + 1)]

    def load_trunk(self, spec: str | os.PathLike) -> None:
        if str(spec) == "download":
            try:
                state = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False,
                                                           check_hash=True, weights_only=True)
            except (OSError, RuntimeError) as exc:
                raise ArgenError(f"cannot download the VGG16 weights ({exc}); pass a local file instead") from exc
        else:
            state = read_weights(spec, "VGG16 weights")
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        expected = {k: v for part in self._slices() for k, v in part.state_dict().items()}  # "N.weight" keys
        if set(features) != set(expected) or any(features[k].shape != expected[k].shape for k in expected):
            raise ArgenError(f"{spec} is not a torchvision VGG16 state dict (expected keys features.N.weight/bias)")
        for part in self._slices():
            part.load_state_dict({k: features[k] for k in part.state_dict()})

    def load_heads(self, path: str | os.PathLike) -> None:
        state = read_weights(path, "LPIPS linear-head weights")
        heads = {}
        for i in range(len(self.net.lins)):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise ArgenError(f"{path} lacks {key}; it is not an lpips v0.1 VGG head file")
            heads[f"{i}.model.1.weight"] = state[key]
        try:
            self.net.lins.load_state_dict(heads)
        except RuntimeError as exc:
            raise ArgenError(f"{path} does not fit the lpips v0.1 VGG heads ({str(exc).splitlines()[-1].strip()})"
                             ) from None

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a.float(), b.float()).reshape(a.shape[0])  # (B, 1, 1, 1) -> (B,)
