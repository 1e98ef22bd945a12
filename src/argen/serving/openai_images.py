"""The OpenAI images API over argen's own request format (`POST /v1/images/generations`, `GET /v1/models`).

Contract:
- `ImagesRequest`: the OpenAI body: `prompt` (required), `n` (default 1), `size` ("WxH", "auto" or absent),
  `response_format` ("b64_json" or absent; "url" is refused: argen keeps no images to link to), `model`,
  `user` (ignored), `output_format` ("png" only), plus argen's own sampling fields as the official
  client's `extra_body` sends them: `cfg_scale`, `cfg_interval`, `cfg_schedule`, `cfg_power`, `top_k`,
  `top_p`, `temperature`, `seed`. Other fields are refused.
- `to_generate_body(body, served)` -> the JSON of the equivalent `POST /v1/generate` request, so the
  validation, defaults and seeding of `argen.serving.request` apply unchanged (image i of a request
  uses the seed rule of `argen sample`). A c2i prompt names one class: its id ("207") or its name
  (case, spaces and underscores do not matter), looked up in `served.class_names`; an unknown name is
  refused with up to five close matches (difflib). A t2i prompt is encoded by the server's text encoder.
- Many models (a base with LoRA adapters, `argen serve --lora NAME=DIR`): `served` is a list, the base first
  (`BASE`), then each adapter (`BASE:NAME`, `ServedModel.adapter` = NAME, with its own classes and class
  names); the request's `model` picks one (default: the base) and an adapter's request carries `adapter`.
- A wrong `size` or `model` is refused naming what the server serves (404 lists every model id); errors
  are `OpenAIError(status, message, param, code)`, answered as `{"error": {"message", "type", "param", "code"}}` (400
  invalid_request_error, 404 model_not_found), the shape the OpenAI clients read.
- `images_answer(result, revised)` -> `{"created": unix seconds, "data": [{"b64_json", "revised_prompt"}]}`.
- `models_answer(served)` -> the `GET /v1/models` list of the served models; each `argen` entry (kind, image
  size, defaults, limits, class names, adapter and base) is what the web page at `/` is built from.
"""

from __future__ import annotations

import base64
import difflib
import json
import re
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass
class ServedModel:
    """What the server serves, as the OpenAI endpoints describe it."""

    id: str
    kind: str
    image_size: int
    num_classes: int | None = None
    class_names: list[str] | None = None
    accepts: list[str] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    max_images: int = 16
    adapter: str | None = None  # the LoRA adapter's served name; None: the base model
    base: str | None = None  # the base model's id (for an adapter)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def size(self) -> str:
        return f"{self.image_size}x{self.image_size}"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


ARGEN_FIELDS = ("cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power", "top_k", "top_p", "temperature", "seed")


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(description="t2i: the caption; c2i: a class id (\"207\") or class name (\"golden retriever\")")
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    user: str | None = None
    cfg_scale: float | None = None
    cfg_interval: int | None = None
    cfg_schedule: str | None = None
    cfg_power: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None


def parse_images_request(raw: bytes) -> ImagesRequest:
    try:
        return ImagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error.get("loc", ()))
        if error.get("type") == "extra_forbidden":
            allowed = ", ".join(["prompt", "model", "n", "size", "response_format", *ARGEN_FIELDS])
            raise OpenAIError(400, f"unknown field {where!r}; this server takes {allowed}", where,
                              "unknown_parameter") from None
        raise OpenAIError(400, f"{where}: {error['msg']}" if where else error["msg"], where or None) from None


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name).strip().casefold()


def class_id(prompt: str, served: ServedModel) -> tuple[int, str]:
    """A c2i prompt -> (class id, the class as named back to the user)."""
    text = prompt.strip()
    names = served.class_names
    if re.fullmatch(r"\d+", text):
        index = int(text)
        label = f"class {index}"
        if names and index < len(names):
            label = f"{names[index]} (class {index})"
        return index, label
    if not names:
        last = (served.num_classes or 1) - 1
        raise OpenAIError(400, f"this model ({served.id}) has no class names; send a class id in 0..{last} as the "
                               f"prompt, e.g. '3'", "prompt", "unknown_class")
    lookup = {_normalise(n): i for i, n in enumerate(names)}
    wanted = _normalise(text)
    if wanted in lookup:
        index = lookup[wanted]
        return index, f"{names[index]} (class {index})"
    close = difflib.get_close_matches(wanted, list(lookup), n=5, cutoff=0.6)
    hint = ("; close matches: " + ", ".join(f"{names[lookup[c]]!r} ({lookup[c]})" for c in close)) if close else \
        f"; send a class id in 0..{len(names) - 1} or one of this model's {len(names)} class names (GET /v1/models)"
    raise OpenAIError(400, f"unknown class {text!r}{hint}", "prompt", "unknown_class")


def pick_model(served: ServedModel | list[ServedModel], model: str | None) -> ServedModel:
    """The served model a request names (None: the first, the base); 404 listing the served ids."""
    models = served if isinstance(served, list) else [served]
    for one in models:
        if model is None or one.id == model:
            return one
    listed = ", ".join(repr(one.id) for one in models)
    raise OpenAIError(404, f"the model {model!r} is not served here; this server serves {listed}", "model",
                      "model_not_found")


def to_generate_body(body: ImagesRequest, served: ServedModel | list[ServedModel]) -> tuple[bytes, str | None]:
    """The equivalent `/v1/generate` JSON body and the revised prompt (the class as resolved) for c2i."""
    served = pick_model(served, body.model)
    if body.model is not None and body.model != served.id:
        raise OpenAIError(404, f"the model {body.model!r} is not served here; this server serves {served.id!r}",
                          "model", "model_not_found")
    if body.size not in (None, "auto", served.size):
        raise OpenAIError(400, f"size {body.size!r} is not served: this model generates {served.size} images only",
                          "size", "unsupported_size")
    if body.response_format not in (None, "b64_json"):
        raise OpenAIError(400, f"response_format {body.response_format!r} is not supported: argen serve keeps no "
                               f"images to link to; use response_format='b64_json'", "response_format",
                          "unsupported_response_format")
    if body.output_format not in (None, "png"):
        raise OpenAIError(400, f"output_format {body.output_format!r} is not supported; images are PNG",
                          "output_format")
    if not body.prompt.strip():
        raise OpenAIError(400, "prompt is empty", "prompt")
    request: dict = {"n": 1 if body.n is None else body.n}
    if served.adapter is not None:
        request["adapter"] = served.adapter
    revised = None
    if served.kind == "c2i":
        index, revised = class_id(body.prompt, served)
        request["classes"] = [index]
    else:
        request["prompts"] = [body.prompt]
    request.update({name: getattr(body, name) for name in ARGEN_FIELDS if getattr(body, name) is not None})
    return json.dumps(request).encode(), revised


def images_answer(pngs: list[bytes], revised: str | None) -> dict:
    data = []
    for png in pngs:
        item = {"b64_json": base64.b64encode(png).decode("ascii")}
        if revised is not None:
            item["revised_prompt"] = revised
        data.append(item)
    return {"created": int(time.time()), "data": data}


def models_answer(served: ServedModel | list[ServedModel]) -> dict:
    return {"object": "list", "data": [{
        "id": one.id, "object": "model", "created": one.created, "owned_by": "argen",
        "argen": {"kind": one.kind, "size": one.size, "image_size": one.image_size,
                  "num_classes": one.num_classes, "class_names": one.class_names, "accepts": one.accepts,
                  "defaults": one.defaults, "max_images_per_request": one.max_images, "adapter": one.adapter,
                  "base": one.base}} for one in (served if isinstance(served, list) else [served])]}
