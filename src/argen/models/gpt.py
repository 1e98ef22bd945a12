"""Llama-style autoregressive generator over raster-ordered image tokens.

The condition is a prefix of `cond_len` tokens (1 class embedding for c2i; `caption_len` projected
caption features for t2i) followed by the image tokens. Position i of the image-token outputs
predicts tokens[:, i] from the condition and tokens[:, :i].

Entry points (the model keeps no inference state; the KV cache belongs to the caller):
- `forward(tokens, cond, cond_mask, drop_cond)`: training with teacher forcing, returns logits
  (B, N, V) and the mean cross-entropy; drops the condition with `class_dropout_prob` in train mode.
- `logits(tokens, cond, cond_mask)`: the same forward without condition dropout.
- `embed_condition`, `embed_tokens`, `forward_cached`, `new_cache`: the pieces a sampler needs for
  prefill and one-token decode against its own cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from argen.nn.llama import TransformerBlock, swiglu_hidden_dim
from argen.nn.norm import RMSNorm
from argen.nn.rope import rope_2d_table
from argen.utils.errors import ArgenError


@dataclass(frozen=True)
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    kind: str = "c2i"
    num_classes: int = 1000
    caption_dim: int = 2048
    caption_len: int = 120
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    image_size: int = 256
    downsample: int = 16
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        if self.kind not in ("c2i", "t2i"):
            raise ArgenError(f"kind must be 'c2i' or 't2i', got {self.kind!r}")
        if self.image_size % self.downsample:
            raise ArgenError(f"image size {self.image_size} is not a multiple of the downsample factor "
                             f"{self.downsample}")
        if self.dim % self.n_head:
            raise ArgenError(f"dim {self.dim} is not divisible by n_head {self.n_head}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def cond_len(self) -> int:
        return 1 if self.kind == "c2i" else self.caption_len

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ArgenError(f"unknown generator config fields: {sorted(unknown)}")
        return cls(**data)


# The fields the training data fixes (the tokenizer's codebook and grid, the classes, the caption features).
# `argen train` replaces all of them from the codes (`argen.training.shape`); a named config's values for
# them are only defaults for building a model directly: the released ImageNet/T5 shape for the paper's
# sizes (what released files need), a small shape for the test and demo configs.
DATA_SHAPE_FIELDS = ("kind", "vocab_size", "image_size", "downsample", "num_classes", "caption_dim",
                     "caption_len")


def _size(name: str, n_layer: int, n_head: int, dim: int) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_head=n_head, dim=dim, name=name)


# Named architectures: layers, width, heads, FFN rounding and dropout defaults (0.1 token/residual/FFN
# dropout, 0.1 class dropout, no drop path, as in LlamaGen), plus default data-shape values (see above).
GPT_CONFIGS: dict[str, GPTConfig] = {
    "GPT-B": _size("GPT-B", 12, 12, 768),
    "GPT-L": _size("GPT-L", 24, 16, 1024),
    "GPT-XL": _size("GPT-XL", 36, 20, 1280),
    "GPT-XXL": _size("GPT-XXL", 48, 24, 1536),
    "GPT-XXXL": _size("GPT-XXXL", 48, 40, 2560),
    "GPT-1B": _size("GPT-1B", 22, 32, 2048),
    "GPT-3B": _size("GPT-3B", 24, 32, 3200),
    "GPT-7B": _size("GPT-7B", 32, 32, 4096),
    # Small configs for tests and CPU demos.
    "GPT-tiny": GPTConfig(n_layer=2, n_head=4, dim=64, multiple_of=32, vocab_size=512, num_classes=10,
                          caption_dim=32, caption_len=8, image_size=64, downsample=16, name="GPT-tiny"),
    "GPT-mini": GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=64, vocab_size=1024, num_classes=10,
                          caption_dim=384, caption_len=16, image_size=64, downsample=8, name="GPT-mini"),
    # the `argen demo` generators: VQ-demo codes (512 entries, 8x8 grid at 64 px), MiniLM captions
    "GPT-demo": GPTConfig(n_layer=4, n_head=4, dim=128, multiple_of=64, vocab_size=512, num_classes=10,
                          caption_dim=384, caption_len=16, image_size=64, downsample=8, name="GPT-demo"),
    "GPT-demo-L": GPTConfig(n_layer=8, n_head=8, dim=384, multiple_of=64, vocab_size=512, num_classes=10,
                            caption_dim=384, caption_len=16, image_size=64, downsample=8, name="GPT-demo-L"),
    "GPT-small": GPTConfig(n_layer=6, n_head=6, dim=384, multiple_of=64, vocab_size=1024, num_classes=10,
                           caption_dim=384, caption_len=16, image_size=64, downsample=8, name="GPT-small"),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    try:
        config = GPT_CONFIGS[name]
    except KeyError:
        raise ArgenError(f"unknown generator config {name!r}; known: {', '.join(GPT_CONFIGS)}") from None
    return replace(config, name=name, **overrides) if overrides else config


class LabelEmbedder(nn.Module):
    """Class id -> one embedding; row `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, C)

    def null_condition(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Caption features (B, L, D) -> (B, L, C); a learned unconditional caption replaces dropped ones."""

    def __init__(self, caption_dim: int, dim: int, caption_len: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(caption_len, caption_dim) / caption_dim ** 0.5)

    def forward(self, captions: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            captions = torch.where(drop[:, None, None], self.uncond_embedding.to(captions.dtype), captions)
        return self.cap_proj(captions)

    def null_condition(self, batch: int, device) -> torch.Tensor:
        return self.uncond_embedding.to(device).expand(batch, -1, -1)


def prefix_attention_mask(cond_mask: torch.Tensor, total_len: int) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: causal, padded prefix slots hidden from everyone but themselves.

    cond_mask is (B, L) with 1 on real caption tokens; positions >= L are image tokens.
    """
    batch, cond_len = cond_mask.shape
    device = cond_mask.device
    causal = torch.ones(total_len, total_len, dtype=torch.bool, device=device).tril()
    key_valid = torch.ones(batch, total_len, dtype=torch.bool, device=device)
    key_valid[:, :cond_len] = cond_mask.bool()
    mask = causal[None] & key_valid[:, None, :]
    mask |= torch.eye(total_len, dtype=torch.bool, device=device)[None]
    return mask[:, None]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        if config.kind == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim)
        else:
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.caption_len)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        hidden = swiglu_hidden_dim(config.dim, config.multiple_of, config.ffn_dim_multiplier)
        drop_path = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList([
            TransformerBlock(config.dim, config.n_head, config.n_kv_head, hidden, config.norm_eps,
                             config.attn_dropout_p, config.resid_dropout_p, config.ffn_dropout_p, drop_path[i])
            for i in range(config.n_layer)
        ])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        rope = rope_2d_table(config.grid_size, config.head_dim, config.rope_base, config.cond_len)
        self.register_buffer("rope", rope, persistent=False)
        # the checkpoint's recommended sampling settings (SamplingParams fields), set by `load_gpt`; None: the
        # per-kind defaults apply (`SamplingParams.for_model`)
        self.sampling_defaults: dict | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(self.output.weight)

    # ----------------------------------------------------------------- inputs
    def check_condition(self, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> None:
        cfg = self.config
        if cfg.kind == "c2i":
            if cond.ndim != 1 or cond.dtype not in (torch.int32, torch.int64):
                raise ArgenError(f"c2i condition must be a (B,) integer tensor of class ids, got "
                                 f"{tuple(cond.shape)} {cond.dtype}")
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= cfg.num_classes):
                raise ArgenError(f"class ids must lie in [0, {cfg.num_classes - 1}], got "
                                 f"[{int(cond.min())}, {int(cond.max())}]")
            return
        if cond.ndim != 3 or not cond.is_floating_point():
            raise ArgenError(f"t2i condition must be float caption features (B, L, D), got {tuple(cond.shape)}")
        if cond.shape[2] != cfg.caption_dim:
            raise ArgenError(f"caption features have width {cond.shape[2]} but the model expects "
                             f"{cfg.caption_dim}")
        if cond.shape[1] != cfg.caption_len:
            raise ArgenError(f"caption features have {cond.shape[1]} tokens but the model expects "
                             f"{cfg.caption_len} (left-padded)")
        if cond_mask is not None and tuple(cond_mask.shape) != tuple(cond.shape[:2]):
            raise ArgenError(f"cond_mask shape {tuple(cond_mask.shape)} does not match captions "
                             f"{tuple(cond.shape[:2])}")

    def null_condition(self, batch: int, device) -> torch.Tensor:
        return self.cls_embedding.null_condition(batch, device)

    def embed_condition(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) ids or (B, L, D) features -> (B, cond_len, C) prefix embeddings."""
        if self.config.kind == "t2i":
            cond = cond.to(self.tok_embeddings.weight.dtype)
        return self.cls_embedding(cond, drop)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    # --------------------------------------------------------------- training
    def _teacher_forcing(self, tokens, cond, cond_mask, drop) -> torch.Tensor:
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] > cfg.num_image_tokens:
            raise ArgenError(f"tokens must be (B, N<={cfg.num_image_tokens}), got {tuple(tokens.shape)}")
        self.check_condition(cond, cond_mask)
        prefix = self.embed_condition(cond, drop)
        h = torch.cat([prefix, self.embed_tokens(tokens[:, :-1])], dim=1)  # (B, Tc + N - 1, C)
        h = self.tok_dropout(h)
        seq = h.shape[1]
        rope = self.rope[:seq]
        mask = None if cond_mask is None else prefix_attention_mask(cond_mask, seq)
        for layer in self.layers:
            h = layer(h, rope, mask)
        h = self.norm(h[:, cfg.cond_len - 1:])
        return self.output(h).float()  # (B, N, V)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                drop_cond: torch.Tensor | None = None):
        """Teacher-forced training step: returns (logits (B, N, V), mean cross-entropy).

        In train mode the condition is dropped for a random `class_dropout_prob` share of the
        batch unless `drop_cond` (B,) bool says exactly which rows to drop.
        """
        if drop_cond is None and self.training and self.config.class_dropout_prob > 0:
            drop_cond = torch.rand(tokens.shape[0], device=tokens.device) < self.config.class_dropout_prob
        logits = self._teacher_forcing(tokens, cond, cond_mask, drop_cond)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return logits, loss

    def logits(self, tokens: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None):
        """Teacher forcing without condition dropout: (B, N) -> (B, N, V) float32 logits."""
        return self._teacher_forcing(tokens, cond, cond_mask, None)

    # -------------------------------------------------------------- inference
    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> list[torch.Tensor]:
        """Allocate an empty KV cache: per layer a (2, B, H_kv, S, D) tensor, owned by the caller.

        Rows may be sliced (`[c[:, a:b] for c in cache]`) to run a subset of rows in place."""
        cfg = self.config
        max_len = max_len or cfg.cond_len + cfg.num_image_tokens
        weight = self.tok_embeddings.weight
        n_kv = cfg.n_kv_head or cfg.n_head
        return [torch.zeros(2, batch, n_kv, max_len, cfg.head_dim, dtype=dtype or weight.dtype,
                            device=device or weight.device) for _ in self.layers]

    def rotation_table(self, device=None) -> torch.Tensor:
        """(S, head_dim/2) complex64 RoPE rotations (cos + i sin) of every sequence position, in
        float32 whatever the model's dtype; built once per device and kept outside the state dict."""
        device = torch.device(device or self.tok_embeddings.weight.device)
        tables = self.__dict__.setdefault("_rotation_tables", {})
        table = tables.get(device)
        if table is None:
            cfg = self.config
            cos_sin = rope_2d_table(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cond_len).to(device)
            table = tables[device] = torch.complex(cos_sin[..., 0], cos_sin[..., 1])
        return table

    def forward_cached(self, h: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor], kv_len: int,
                       mask: torch.Tensor | None = None, *, last_only: bool = False,
                       slots: torch.Tensor | None = None) -> torch.Tensor:
        """The cached forward every sampler runs (prefill, one-token decode, multi-token verify).

        h: (B, T, C) embeddings (`embed_condition` / `embed_tokens`) at sequence `positions`:
        (T,) shared by all rows, or (B, T) one per row (slots at different steps). Each layer
        writes its keys/values into `cache` (from `new_cache`, or a row slice of one) at those
        positions and attends over cache slots [0, kv_len) only. mask: None, or (B, 1, T, kv_len)
        bool (True = visible) or additive float in the cache dtype. With mask None a single token
        sees every slot < kv_len and T > 1 tokens are causal by position (each sees slots <= its
        own position). last_only: compute logits for the last token only. Returns float32 logits
        (B, T, V), or (B, 1, V) with last_only. No dropout, whatever the mode; no state kept.
        slots: where the keys/values go instead of `positions` (same shape), for tokens that share a
        sequence position (the candidates of a draft tree); the mask then decides who sees them.
        """
        seq = h.shape[1]
        if mask is None and seq > 1:
            keys = torch.arange(kv_len, device=h.device)
            mask = keys <= positions[..., :, None]  # (T, kv) or (B, T, kv)
            mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
        if mask is not None and mask.dtype == torch.bool:  # additive once, not in every layer
            mask = torch.zeros(mask.shape, dtype=cache[0].dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        rotation = self.rotation_table(h.device)[positions]  # (T, D/2) or (B, T, D/2)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer.forward_cached(h, rotation, layer_cache, positions if slots is None else slots, kv_len, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def flops_per_token(self) -> float:
        return 6.0 * self.num_parameters()


