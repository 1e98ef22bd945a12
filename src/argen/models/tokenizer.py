"""VQGAN-style image tokenizer: conv encoder -> L2-normalised vector quantizer -> conv decoder.

Contract:
- `encode(images)`: (B, 3, H, W) float in [-1, 1] -> codes (B, H/p, W/p) int64, p = downsample.
- `decode(codes)`: (B, h, w) -> (B, 3, h*p, w*p), the raw decoder output (not clamped).
- `reconstruct(images)`: encode -> quantize -> decode.
- `forward(images)` (training): `VQOutput` with the reconstruction, codebook/commitment/entropy
  losses and codebook usage.
Module names mirror the released LlamaGen files so they load strictly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from argen.nn.conv import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from argen.nn.quantizer import VectorQuantizer
from argen.utils.errors import ArgenError


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    base_channels: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32
    name: str = field(default="custom", compare=False)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VQConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ArgenError(f"unknown tokenizer config fields: {sorted(unknown)}")
        data = dict(data)
        for key in ("encoder_ch_mult", "decoder_ch_mult"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


VQ_CONFIGS: dict[str, VQConfig] = {
    "VQ-16": VQConfig(name="VQ-16"),
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), name="VQ-8"),
    # Small configs for tests and CPU demos.
    "VQ-tiny": VQConfig(codebook_size=512, codebook_embed_dim=8, base_channels=32, encoder_ch_mult=(1, 2),
                        decoder_ch_mult=(1, 2), num_res_blocks=1, z_channels=32, norm_groups=8,
                        name="VQ-tiny"),
    "VQ-tiny-16": VQConfig(codebook_size=512, codebook_embed_dim=8, base_channels=16, encoder_ch_mult=(1, 1, 2, 2, 2),
                           decoder_ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=16, norm_groups=8,
                           name="VQ-tiny-16"),
    "VQ-small-8": VQConfig(codebook_size=1024, codebook_embed_dim=8, base_channels=64,
                           encoder_ch_mult=(1, 1, 2, 2), decoder_ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                           z_channels=64, norm_groups=32, name="VQ-small-8"),
    "VQ-small-4": VQConfig(codebook_size=1024, codebook_embed_dim=8, base_channels=64,
                           encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), num_res_blocks=1,
                           z_channels=64, norm_groups=32, name="VQ-small-4"),
    # CPU-trainable tokenizer for the 64x64 demo emoji set: 8x8 codes, 512-entry codebook. One GroupNorm
    # group: with 8 groups the 8-channel full-resolution stages normalised each channel on its own (an
    # instance norm), which removed every channel's per-image mean and with it most of the image's colour
    # (reds came out brown, everything on an orange-blue axis). 16-d codes: slightly better PSNR and colour, same cost.
    "VQ-demo": VQConfig(codebook_size=512, codebook_embed_dim=16, base_channels=8, encoder_ch_mult=(1, 2, 4, 8),
                        decoder_ch_mult=(1, 2, 4, 8), num_res_blocks=1, z_channels=32, norm_groups=1,
                        name="VQ-demo"),
}


def with_downsample(cfg: VQConfig, factor: int) -> VQConfig:
    """`cfg` with `factor` = 2**k spatial downsampling: levels are removed from, or copies of the first
    level's multiplier added at, the full-resolution end (VQ-16's (1, 1, 2, 2, 4) <-> VQ-8's (1, 2, 2, 4))."""
    if factor < 2 or factor & (factor - 1):
        raise ArgenError(f"downsample must be a power of two >= 2, got {factor}")
    levels = factor.bit_length()  # 2**(levels-1) == factor
    mults = []
    for mult in (cfg.encoder_ch_mult, cfg.decoder_ch_mult):
        mult = tuple(mult)
        mult = mult[len(mult) - levels:] if levels <= len(mult) else (mult[0],) * (levels - len(mult)) + mult
        mults.append(mult)
    return replace(cfg, encoder_ch_mult=mults[0], decoder_ch_mult=mults[1])


def vq_config(name: str, **overrides) -> VQConfig:
    try:
        config = VQ_CONFIGS[name]
    except KeyError:
        raise ArgenError(f"unknown tokenizer config {name!r}; known: {', '.join(VQ_CONFIGS)}") from None
    return replace(config, **overrides) if overrides else config


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, mult, groups = cfg.base_channels, cfg.encoder_ch_mult, cfg.norm_groups
        self.num_res_blocks = cfg.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            block_out = ch * m
            is_last = level == len(mult) - 1
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.res.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if is_last:
                    stage.attn.append(AttnBlock(block_in, groups))
            if not is_last:
                stage.downsample = Downsample(block_in)
            self.conv_blocks.append(stage)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout, groups), AttnBlock(block_in, groups),
                                  ResnetBlock(block_in, block_in, cfg.dropout, groups)])
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            for i, res in enumerate(stage.res):
                h = res(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, mult, groups = cfg.base_channels, cfg.decoder_ch_mult, cfg.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout, groups), AttnBlock(block_in, groups),
                                  ResnetBlock(block_in, block_in, cfg.dropout, groups)])
        self.conv_blocks = nn.ModuleList()
        for level, m in enumerate(reversed(mult)):  # lowest resolution first
            block_out = ch * m
            stage = nn.Module()
            stage.res = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.res.append(ResnetBlock(block_in, block_out, cfg.dropout, groups))
                block_in = block_out
                if level == 0:
                    stage.attn.append(AttnBlock(block_in, groups))
            if level != len(mult) - 1:
                stage.upsample = Upsample(block_in)
            self.conv_blocks.append(stage)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for stage in self.conv_blocks:
            for i, res in enumerate(stage.res):
                h = res(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


@dataclass
class VQOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W)
    codes: torch.Tensor  # (B, h, w)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    codebook_usage: float


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.commit_loss_beta,
                                        config.entropy_loss_ratio, config.codebook_l2_norm)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ArgenError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.downsample
        if images.shape[2] % p or images.shape[3] % p:
            raise ArgenError(f"image size {images.shape[2]}x{images.shape[3]} is not a multiple of the "
                             f"tokenizer's downsample factor {p}")

    def _param_dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self.quant_conv(self.encoder(images.to(self._param_dtype())))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/p, W/p) int64 codes."""
        return self.quantize(self.encode_latents(images)).codes

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, 3, h*p, w*p) raw decoder output."""
        if codes.ndim != 3:
            raise ArgenError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ArgenError(f"codes must lie in [0, {self.config.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        latents = self.quantize.lookup(codes.long()).to(self._param_dtype())
        return self.decode_latents(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        quantized = self.quantize(self.encode_latents(images)).quantized
        return self.decode_latents(quantized)

    def forward(self, images: torch.Tensor) -> VQOutput:
        q = self.quantize(self.encode_latents(images))
        return VQOutput(self.decode_latents(q.quantized), q.codes, q.codebook_loss, q.commitment_loss,
                        q.entropy_loss, q.usage)
