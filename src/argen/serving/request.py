"""`POST /v1/generate` requests: the JSON schema, validation against the model, and the answer format.

Contract:
- `parse_request(body, service)` -> `(JobSpec, params)` or raises `RequestError(status, message)`:
  422 for anything invalid (bad JSON, wrong types, unknown fields, non-finite numbers, wrong kind of
  condition, class id out of range, bad sampling values, malformed caption features), 413 when the
  request asks for more than `max_images_per_request` images. Types are strict: `"3"`, `3.0` and
  `true` are not integers.
- Images: each class id / prompt / caption gives `n` images, in order: `{"classes": [1, 2], "n": 3}`
  makes 6 images, classes 1, 1, 1, 2, 2, 2; image i uses seed `seed * 1000003 + i`.
- `params` echoes every effective setting (the model's own or per-kind defaults of `SamplingParams.for_model` filled in,
  the seed drawn when none was given). A guidance scale above `MAX_CFG_SCALE` (whose guided logits
  would overflow) is a 422.
- `adapter`: the name of a LoRA adapter the server serves (`argen serve --lora NAME=DIR`; GET /v1/models lists
  them as BASE:NAME); absent or null: the base model. An unknown name is a 404 naming the served adapters.
  Class ids are checked against the chosen model's classes (an adapter may bring its own).
- `wants_png(accept, images)`: the answer is the PNG itself when `Accept` lists `image/png` (or
  `image/*`) at least as high as JSON and the request makes one image; a PNG-only `Accept` for
  several images is refused with 406 before any work.
"""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from argen.sampling.logits import SamplingParams
from argen.serving.features import parse_captions
from argen.serving.service import GenerationService, JobSpec
from argen.utils.errors import ArgenError

MAX_PROMPT_CHARS = 2000


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    classes: list[int] | None = Field(None, description="c2i: class ids, each gives `n` images")
    prompts: list[str] | None = Field(None, description="t2i: captions, encoded by the server's text encoder")
    features: Any = Field(None, description="t2i: caption features instead of prompts: a list of captions, each a "
                                            "list of rows of caption_dim numbers, or base64 of a .npy (B, L, D)")
    mask: Any = Field(None, description="with `features`: (B, caption_len) 0/1, left padded; lists or base64 .npy")
    n: int = Field(1, ge=1, description="images per class id / prompt / caption")
    # every sampling default is None: the model's own recommended settings, else the kind's, fill it in
    cfg_scale: float | None = Field(None, description="guidance scale (default: the model's, else 4.0 c2i, 7.5 t2i)")
    cfg_interval: int | None = Field(None, description="guide tokens 0..i+1 only (default -1: all)")
    cfg_schedule: str | None = Field(None, description="constant (default), linear or power")
    cfg_power: float | None = Field(None, description="power schedule exponent (default 1.0)")
    top_k: int | None = Field(None, description="0 turns it off (default: the model's, else 2000 c2i, 1000 t2i)")
    top_p: float | None = Field(None, description="nucleus filter in (0, 1] (default: the model's, else 1.0)")
    temperature: float | None = Field(None, description="default: the model's, else 1.0")
    seed: int | None = Field(None, ge=0, lt=2**63, description="default: drawn at random, echoed in params")
    adapter: str | None = Field(None, description="a LoRA adapter of this server by name (GET /v1/models lists "
                                                  "them as BASE:NAME); default: the base model")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _schema_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(x) for x in error.get("loc", ()))
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "invalid request: " + "; ".join(parts)


def _either(names: list[str], word: str = "or") -> str:
    return f" {word} ".join(f"`{n}`" for n in names)


def _adapter(body: GenerateRequest, service: GenerationService) -> int | None:
    """The request's adapter index (None: the base); 404 for a name the server does not serve."""
    if body.adapter is None:
        return None
    names = service.adapter_names
    if body.adapter not in names:
        served = f"it serves {', '.join(repr(n) for n in names)} (or none: the base)" if names else \
            "it serves the base model only"
        raise RequestError(404, f"unknown adapter {body.adapter!r}: {served}")
    return names.index(body.adapter)


def _request_conditions(body: GenerateRequest, service: GenerationService, adapter: int | None) -> tuple[list, dict]:
    """The request's conditions (one per class id / prompt / caption) and their echo for `params`."""
    cfg = service.gpt.config
    given = [name for name in ("classes", "prompts", "features") if getattr(body, name) is not None]
    accepted = service.accepts()
    if body.mask is not None and body.features is None:
        raise RequestError(422, "`mask` goes with `features`; send both, or `features` alone for unpadded captions")
    if len(given) != 1:
        raise RequestError(422, f"give exactly one condition field; this server takes {_either(accepted)}, got "
                                f"{_either(given, 'and') if given else 'none'}")
    name = given[0]
    if name not in accepted:
        what = "a class-conditional" if cfg.kind == "c2i" else "a text-conditional"
        extra = " (started with --text-encoder none)" if name == "prompts" and cfg.kind == "t2i" else ""
        raise RequestError(422, f"this server runs {what} model{extra}: send {_either(accepted)}, not `{name}`")
    if name == "classes":
        if not body.classes:
            raise RequestError(422, "`classes` is empty")
        classes = service.num_classes(adapter)
        bad = [c for c in body.classes if not 0 <= c < classes]
        if bad:
            raise RequestError(422, f"class ids must lie in [0, {classes - 1}], got {bad[:5]}")
        return body.classes, {"classes": body.classes}
    if name == "prompts":
        if not body.prompts:
            raise RequestError(422, "`prompts` is empty")
        if any(not p.strip() for p in body.prompts):
            raise RequestError(422, "prompts must be non-empty strings")
        if any(len(p) > MAX_PROMPT_CHARS for p in body.prompts):
            raise RequestError(422, f"prompts must be at most {MAX_PROMPT_CHARS} characters")
        return body.prompts, {"prompts": body.prompts}
    try:
        captions = parse_captions(body.features, body.mask, cfg.caption_len, cfg.caption_dim)
    except ArgenError as exc:
        raise RequestError(422, str(exc)) from None
    return captions, {"features": {"captions": len(captions), "tokens": [c.tokens for c in captions],
                                   "mask": body.mask is not None}}


def parse_request(body: bytes, service: GenerationService) -> tuple[JobSpec, dict]:
    """Raw JSON body -> (JobSpec with one condition per image, effective params); raises RequestError."""
    try:
        request = GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(422, _schema_message(exc)) from None
    adapter = _adapter(request, service)
    conditions, echo = _request_conditions(request, service, adapter)
    total = len(conditions) * request.n
    limit = service.config.max_images_per_request
    if total > limit:
        raise RequestError(413, f"{total} images requested ({len(conditions)} x n={request.n}); this server allows "
                                f"at most {limit} per request")
    try:
        params = SamplingParams.for_model(
            service.gpt, cfg_scale=request.cfg_scale, cfg_interval=request.cfg_interval,
            cfg_schedule=request.cfg_schedule, cfg_power=request.cfg_power, temperature=request.temperature,
            top_p=request.top_p, top_k=request.top_k)
    except ArgenError as exc:
        raise RequestError(422, str(exc)) from None
    seed = secrets.randbits(62) if request.seed is None else request.seed
    expanded = [c for c in conditions for _ in range(request.n)]
    echo.update({"adapter": request.adapter} if adapter is not None else {})
    return JobSpec(expanded, params, seed, adapter=adapter), {**params.to_dict(), "seed": seed, "n": request.n,
                                                              "images": total, **echo}


def _accept_quality(accept: str) -> dict[str, float]:
    """`Accept` header -> {media range: q}."""
    out = {}
    for part in accept.split(","):
        media, *options = (x.strip() for x in part.split(";"))
        quality = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    quality = float(option[2:])
                except ValueError:
                    quality = 0.0
        if media:
            out[media.lower()] = quality
    return out


def wants_png(accept: str | None, images: int) -> bool:
    """Whether to answer with the PNG itself; raises RequestError(406) for PNG-only with several images."""
    quality = _accept_quality(accept or "")
    png = max(quality.get("image/png", 0.0), quality.get("image/*", 0.0))
    json = max([quality.get(m, 0.0) for m in ("application/json", "application/*", "*/*")] + [0.0 if quality
                                                                                              else 1.0])
    if png <= 0 or png < json:
        return False
    if images == 1:
        return True
    if json > 0:
        return False
    raise RequestError(406, f"an image/png answer holds one image and this request makes {images}; ask for one "
                            f"image or accept application/json (base64 PNGs)")
