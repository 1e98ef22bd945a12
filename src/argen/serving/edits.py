"""Edit requests: `POST /v1/images/edits` (OpenAI's multipart form) and `POST /v1/edit` (argen's JSON).

Contract:
- `read_upload(request, limit)`: the raw body, 413 past `limit` bytes (the server's --max-body-mb),
  before reading it when Content-Length says so.
- `parse_openai_edit(body, headers, served)`: OpenAI's multipart form: `image` (or `image[]`, the first
  one), `mask` (optional), `prompt` (required), `n`, `size`, `response_format` (b64_json), `model`,
  `user`, `output_format` (png) and argen's sampling fields (`seed`, `cfg_scale`, ...), as strings.
  Returns (the equivalent `/v1/generate` JSON body, the revised prompt, image bytes, mask bytes or None).
  Field errors are `OpenAIError`s (400, as for generations).
- `parse_argen_edit(body)`: argen's JSON: `image` (base64 PNG/JPEG), optional `mask` (base64 PNG) or
  `box` ([x0, y0, x1, y1] pixels, x1/y1 exclusive), plus any `/v1/generate` fields (`classes` or
  `prompts`, `n`, sampling fields, `seed`). Returns (generate body, image bytes, mask bytes, box).
- `prepare_edit(service, image, mask, box)` -> `EditInput`: the image centre-cropped and resized to the
  model's size, the mask rounded to the token grid (a token is regenerated when any pixel it covers is
  masked, `argen.editing.masks.token_mask`), and the (N,) forced tokens (the tokenizer's codes, -1 where
  regenerated). Mask rules: alpha 0 = edited (OpenAI's), no alpha -> white = edited; with no mask and no
  box, the image's own transparent pixels are the mask (OpenAI's rule). An unreadable image or mask, a
  mask of another size, a box outside the image, or nothing to say where to edit is a 422
  `RequestError`. A mask that keeps every token is not an error: the answer is the tokenizer's round
  trip and says so (`kept_everything`).
- The job then goes through the same queue, limits (413 images per request, 503 queue full) and
  continuous scheduler as generation, its images carrying the forced tokens on their slots.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from argen.editing import encode_images, fit_image, forced_tokens, mask_from_image, read_image, token_mask
from argen.editing.masks import box_mask, check_mask, image_alpha_mask
from argen.serving.openai_images import ARGEN_FIELDS, ImagesRequest, OpenAIError, ServedModel, to_generate_body
from argen.serving.request import RequestError
from argen.utils.errors import ArgenError

FORM_FIELDS = ("image", "image[]", "mask", "prompt", "n", "size", "response_format", "model", "user", "output_format",
               *ARGEN_FIELDS)
INTEGER_FIELDS = ("n", "cfg_interval", "top_k", "seed")
FLOAT_FIELDS = ("cfg_scale", "cfg_power", "top_p", "temperature")


@dataclass
class EditInput:
    forced: torch.Tensor  # (N,) int64: the kept token, or -1 where regenerated
    token_mask: torch.Tensor  # (g, g) bool, True = regenerated

    @property
    def regenerated(self) -> int:
        return int(self.token_mask.sum())

    @property
    def kept_everything(self) -> bool:
        return self.regenerated == 0

    def echo(self) -> dict:
        note = ("the mask keeps every token: nothing was regenerated; the images are the tokenizer's round trip"
                if self.kept_everything else None)
        return {"mask": self.token_mask.int().tolist(), "regenerated_tokens": self.regenerated,
                "kept_everything": self.kept_everything, **({"note": note} if note else {})}


async def read_upload(request: Request, limit: int) -> bytes:
    too_big = f"the upload is over {limit} bytes, the limit of this server (--max-body-mb)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(body: bytes, headers: Headers):
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise OpenAIError(400, f"send the edit as multipart/form-data (OpenAI's images.edit), not {kind or 'nothing'}")

    async def stream():
        yield body

    try:
        return await MultiPartParser(headers, stream(), max_files=4, max_fields=32).parse()
    except MultiPartException as exc:
        raise OpenAIError(400, f"malformed multipart form: {exc.message}") from None


def _number(name: str, text: str):
    try:
        return int(text) if name in INTEGER_FIELDS else float(text)
    except ValueError:
        raise OpenAIError(400, f"{name} must be {'an integer' if name in INTEGER_FIELDS else 'a number'}, got {text!r}",
                          name) from None


async def parse_openai_edit(body: bytes, headers: Headers, served: ServedModel | list[ServedModel]):
    """The multipart form -> (generate body, revised prompt, image bytes, mask bytes or None)."""
    form = await _form(body, headers)
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise OpenAIError(400, f"unknown field {unknown[0]!r}; this server takes {', '.join(FORM_FIELDS)}",
                          unknown[0], "unknown_parameter")
    images = form.getlist("image") + form.getlist("image[]")
    if not images or not isinstance(images[0], UploadFile):
        raise OpenAIError(400, "send the image to edit as the file field `image`", "image")
    if len(images) > 1:
        raise OpenAIError(400, "this server edits one image per request", "image")
    mask = form.get("mask")
    if mask is not None and not isinstance(mask, UploadFile):
        raise OpenAIError(400, "send the mask as a file (PNG)", "mask")
    fields = {}
    for name in ("prompt", "n", "size", "response_format", "model", "user", "output_format", *ARGEN_FIELDS):
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise OpenAIError(400, f"{name} must be a text field", name)
        fields[name] = _number(name, value) if name in INTEGER_FIELDS + FLOAT_FIELDS else value
    if "prompt" not in fields:
        raise OpenAIError(400, "prompt is required", "prompt")
    try:
        request = ImagesRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error.get("loc", ()))
        raise OpenAIError(400, f"{where}: {error['msg']}", where or None) from None
    generate_body, revised = to_generate_body(request, served)
    image_bytes = await images[0].read()
    mask_bytes = None if mask is None else await mask.read()
    return generate_body, revised, image_bytes, mask_bytes


def _b64(text, name: str) -> bytes:
    if not isinstance(text, str):
        raise RequestError(422, f"`{name}` must be a base64 string of a PNG or JPEG file")
    try:
        return base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"`{name}` is not valid base64") from None


def parse_argen_edit(body: bytes):
    """argen's JSON edit body -> (generate body, image bytes, mask bytes or None, box or None)."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(422, f"invalid JSON: {exc}") from None
    if not isinstance(request, dict) or "image" not in request:
        raise RequestError(422, "send {\"image\": base64 PNG, \"mask\": base64 PNG or \"box\": [x0, y0, x1, y1], "
                                "and the condition (classes or prompts)}")
    image = _b64(request.pop("image"), "image")
    mask = request.pop("mask", None)
    box = request.pop("box", None)
    if mask is not None and box is not None:
        raise RequestError(422, "send `mask` or `box`, not both")
    if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(type(v) is int for v in box)):
        raise RequestError(422, "`box` must be [x0, y0, x1, y1]: four integers (pixels, x1 and y1 exclusive)")
    return json.dumps(request).encode(), image, None if mask is None else _b64(mask, "mask"), box


def prepare_edit(service, image: bytes, mask: bytes | None = None, box: list[int] | None = None) -> EditInput:
    """Image and mask bytes -> the forced tokens of the edit; RequestError(422) on a bad image or mask."""
    cfg = service.gpt.config
    try:
        picture = read_image(image)
        width, height = picture.size
        if mask is not None:
            pixels = check_mask(mask_from_image(read_image(mask, "mask")), height, width)
        elif box is not None:
            pixels = box_mask(height, width, tuple(box))
        else:
            pixels = image_alpha_mask(picture)
            if pixels is None:
                raise ArgenError("send a mask (alpha 0 or, without alpha, white = edit), or an image whose "
                                 "transparent pixels (alpha 0) mark where to edit")
        regenerate = token_mask(pixels, cfg.grid_size)  # (g, g)
        fitted = fit_image(picture, cfg.image_size)[None]  # (1, S, S, 3)
    except ArgenError as exc:
        raise RequestError(422, str(exc)) from None
    codes = encode_images(service.tokenizer, np.ascontiguousarray(fitted))  # (1, g, g)
    return EditInput(forced_tokens(codes, regenerate[None])[0], regenerate)
