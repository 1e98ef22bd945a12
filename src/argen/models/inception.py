"""The FID Inception v3 network (the 2015-12-05 TensorFlow graph used by the ADM/TTUR evaluators).

Contract:
- `FIDInception()` has exactly the parameter/buffer layout of `pt_inception-2015-12-05-6726825d.pth`
  (pytorch-fid / torch-fidelity): 94 conv+batch-norm units named like torchvision's Inception3
  (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...; no `num_batches_tracked`)
  and a 1008-way `fc`. 472 tensors in all.
- `forward(images)` takes (B, H, W, 3) uint8 (NHWC, as stored in ADM npz batches) or (B, 3, H, W) float
  already on the 0..255 scale, resizes to 299x299 with TensorFlow 1.x `ResizeBilinear` semantics
  (align_corners=False, no half-pixel offset), normalises with (x - 128) / 128 like the graph, and returns
  `InceptionFeatures(pool (B, 2048), spatial (B, 2023), logits (B, 1008))`:
  `pool` is the graph's `pool_3`; `spatial` is `mixed_6/conv` (the ReLU output of Mixed_6d.branch1x1,
  (B, 17, 17, 192)) cut to its first 7 channels and flattened in NHWC order, as ADM's sFID uses;
  `logits` are `pool @ fc.weight.T` without the bias, as ADM's Inception Score takes them.
- `load_inception(path)` loads a local weight file strictly with `torch.load(weights_only=True)`;
  `random_inception(seed)` builds the network with fixed random weights (tests only: its numbers are
  not FIDs); `build_inception("download")` fetches the published file once with torch.hub (sha256 prefix
  checked, as `torch.hub.load_state_dict_from_url(check_hash=True)` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv_inception

from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import cache_dir, sha256_file
from argen.utils.torch_utils import load_torch_file

INCEPTION_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
# torch.hub convention: the 8 hex digits in the file name are the start of the file's sha256.
INCEPTION_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3


@dataclass
class InceptionFeatures:
    pool: torch.Tensor  # (B, 2048)
    spatial: torch.Tensor  # (B, 17 * 17 * 7)
    logits: torch.Tensor  # (B, 1008), no bias


class FrozenBatchNorm(nn.Module):
    """Inference-only batch norm with the four tensors of the published file (no batch counter)."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvUnit(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: one `conv`/`batchnorm` pair of the TF graph (torchvision's
    `BasicConv2d` with a frozen batch norm; used as the `conv_block` of torchvision's Inception blocks)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


# The blocks are torchvision's (layers, names and the B/D forwards unchanged); A, C and E pool their
# `branch_pool` input as the 2015 TF graph does instead (torchvision's average pool counts the padding).
class BlockA(tv_inception.InceptionA):
    """35x35 block (graph `mixed`, `mixed_1`, `mixed_2`)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__(cin, pool_features, conv_block=ConvUnit)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [a, b, c, self.branch_pool(_avg_pool_same(x))]


def block_b(cin: int) -> nn.Module:
    """35 -> 17 reduction (graph `mixed_3`): torchvision's InceptionB as is."""
    return tv_inception.InceptionB(cin, conv_block=ConvUnit)


class BlockC(tv_inception.InceptionC):
    """17x17 block with factorised 7x7 convolutions (graph `mixed_4` .. `mixed_7`)."""

    def __init__(self, cin: int, c7: int):
        super().__init__(cin, c7, conv_block=ConvUnit)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for unit in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = unit(c)
        return [a, b, c, self.branch_pool(_avg_pool_same(x))]


def block_d(cin: int) -> nn.Module:
    """17 -> 8 reduction (graph `mixed_8`): torchvision's InceptionD as is."""
    return tv_inception.InceptionD(cin, conv_block=ConvUnit)


class BlockE(tv_inception.InceptionE):
    """8x8 block with split 1x3/3x1 heads (graph `mixed_9`, `mixed_10`). The 2015 graph pools the last
    block's pool branch with a max pool, the one before with an average pool."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__(cin, conv_block=ConvUnit)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return [a, b, c, self.branch_pool(pooled)]


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size, size) with TF 1.x ResizeBilinear(align_corners=False):
    output pixel i samples input coordinate i * H / size (no half-pixel shift), clamped at the edge."""
    out = x
    for dim in (2, 3):
        n_in = out.shape[dim]
        if n_in == size:
            continue
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo.double()).to(out.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        frac = frac.view(shape)
        out = out.index_select(dim, lo) * (1 - frac) + out.index_select(dim, hi) * frac
    return out


class FIDInception(nn.Module):
    """Inception v3 as in the 2015-12-05 TF graph; see the module docstring for inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = block_b(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = block_d(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_id = "uninitialised"
        self.is_random = True
        self.sha256: str | None = None
        self.matches_published = False
        self._spatial: torch.Tensor | None = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) on 0..255 -> normalised (B, 3, 299, 299)."""
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ArgenError(f"uint8 images must be (B, H, W, 3) NHWC, got shape {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2)
        elif images.ndim != 4 or images.shape[1] != 3:
            raise ArgenError(f"float images must be (B, 3, H, W) on the 0..255 scale, got {tuple(images.shape)}")
        x = images.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        x = tf1_resize_bilinear(x, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = self.preprocess(images)  # (B, 3, 299, 299)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
            x = getattr(self, name)(x)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool = x.mean(dim=(2, 3))  # (B, 2048)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7)
        self._spatial = None
        logits = pool @ self.fc.weight.T  # (B, 1008)
        return InceptionFeatures(pool.float(), spatial.float(), logits.float())

    def logits_from_pool(self, pool: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool features -> (B, 1008) unbiased logits (what ADM's IS feeds to the softmax)."""
        weight = self.fc.weight.detach().to(device=pool.device, dtype=pool.dtype)
        return pool @ weight.T


def random_inception(seed: int = 0) -> FIDInception:
    """The network with fixed random weights: for testing shapes and plumbing, never for real numbers."""
    model = FIDInception()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bn.bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif name.endswith("bn.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    model.weights_id = f"random-seed{seed}"
    model.is_random = True
    return model.eval().requires_grad_(False)



def load_inception(path: str | Path) -> FIDInception:
    """Load the published FID Inception weights from a local file, strictly."""
    path = Path(path)
    if not path.is_file():
        raise ArgenError(f"Inception weights {path} not found; download {INCEPTION_FILE_NAME} "
                         f"({INCEPTION_URL}) or pass --inception random for a test run")
    try:
        state = load_torch_file(path, what="Inception weights")
    except ArgenError as exc:
        raise CheckpointError(str(exc)) from exc.__cause__
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a state dict of the FID Inception network")
    model = FIDInception()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{path} is not the FID Inception layout: {len(missing)} missing (e.g. {missing[:3]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(misshaped)} mis-shaped "
                              f"(e.g. {misshaped[:3]}) keys")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    digest = sha256_file(path)
    model.weights_id = f"sha256:{digest[:16]}"
    model.is_random = False
    model.sha256 = digest
    model.matches_published = digest.startswith(INCEPTION_SHA256_PREFIX)
    return model.eval().requires_grad_(False)


def download_inception(dest: str | Path, progress: bool = False) -> Path:
    """Download the published weights to `dest` with `torch.hub.download_url_to_file`, which writes a
    temp file beside `dest`, checks that its sha256 starts with the prefix the file name carries, and only
    then moves it into place (nothing is kept on a mismatch). Needs network access; never called by tests."""
    from torch.hub import download_url_to_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(INCEPTION_URL, str(dest), hash_prefix=INCEPTION_SHA256_PREFIX, progress=progress)
    except RuntimeError as exc:  # torch.hub's "invalid hash value (expected ..., got ...)"
        raise ArgenError(f"downloaded Inception weights fail the sha256 check ({exc}); expected a digest starting "
                         f"with {INCEPTION_SHA256_PREFIX}; not saved") from None
    return dest


def default_weights_path() -> Path:
    """Where `download` keeps the weights: $ARGEN_CACHE or ~/.cache/argen."""
    return cache_dir() / INCEPTION_FILE_NAME


def build_inception(spec: str, seed: int = 0) -> FIDInception:
    """`spec` is a weight file path, `random`, or `download` (the published file, fetched once into
    `default_weights_path()` with its sha256 prefix checked; needs network access)."""
    if spec == "random":
        return random_inception(seed)
    if spec == "download":
        path = default_weights_path()
        if not path.is_file():
            try:
                download_inception(path)
            except OSError as exc:
                raise ArgenError(f"could not download the Inception weights ({exc}); fetch {INCEPTION_URL} "
                                 f"yourself and pass --inception PATH") from exc
        return load_inception(path)
    return load_inception(spec)
