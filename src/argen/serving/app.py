"""FastAPI application over a `GenerationService`.

Endpoints:
- `POST /v1/generate`: JSON `{"classes": [..]}` (c2i), `{"prompts": [..]}` or `{"features": ..,
  "mask": ..}` (t2i), optional `n` (images per class/prompt/caption, default 1), `cfg_scale`,
  `cfg_interval`, `cfg_schedule`, `cfg_power`, `top_k`, `top_p`, `temperature`, `seed` (validation
  and meaning: `argen.serving.request`). Answers `{"images": [base64 PNG], "codes": [[N ints] per
  image], "params": {..effective settings}, "timings": {..}}`, or the PNG itself (params and timings
  in `X-Argen-Params` / `X-Argen-Timings`) when `Accept` asks for `image/png` and there is one image.
  Errors are `{"error": "<what to fix>"}`: 422 invalid request; 413 too many images or a body over
  `max_body_bytes`; 415 a non-JSON content type; 406 PNG-only `Accept` for several images;
  503 queue full or shutting down; 499 the client went away (its queued work is dropped); 500 failure.
- `GET /health`: model, accepted condition fields, limits, queue depth. `GET /metrics`: counters,
  queue depth, images/s, latency p50/p99 (see `GenerationService.metrics`).
- OpenAI images API (`argen.serving.openai_images`): `POST /v1/images/generations` (prompt = class id or
  name for c2i, caption for t2i; n, size, response_format=b64_json, model, and argen's sampling fields)
  answers `{"created", "data": [{"b64_json", "revised_prompt"}]}`, errors `{"error": {"message", "type",
  "param", "code"}}`; `GET /v1/models` lists the served models (`GET /v1/models/{id}`: that one): the base,
  and `BASE:NAME` for each LoRA adapter (`argen serve --lora NAME=DIR`); the `model` field picks one (default
  the base; an unknown one is a 404 listing the served ids), as argen's own `adapter` field does (NAME).
  Images of every model share the engine's batches. Images go through the same validation, queue and
  batching as `/v1/generate`.
- Editing (`argen.serving.edits`): `POST /v1/images/edits`, OpenAI's multipart form (`image`, `mask`,
  `prompt`, `n`, `size`, `response_format`, `model`, argen's sampling fields), answered like generations;
  `POST /v1/edit`, argen's JSON (`image` base64, `mask` base64 or `box`, and the `/v1/generate` fields),
  answered like `/v1/generate` plus `mask` (the token mask used), `regenerated_tokens` and
  `kept_everything`. Bad images or masks are 422, uploads over `max_body_bytes` 413, a full queue 503.
- `GET /`: the web page (`argen/serving/static/index.html`, plain HTML + JS that calls the endpoints above).
The app starts the service's worker on startup and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from argen.nn.lora import multi_lora
from argen.serving.edits import parse_argen_edit, parse_openai_edit, prepare_edit, read_upload
from argen.serving.openai_images import (
    ImagesRequest,
    OpenAIError,
    ServedModel,
    images_answer,
    models_answer,
    parse_images_request,
    pick_model,
    to_generate_body,
)
from argen.serving.request import GenerateRequest, RequestError, parse_request, wants_png
from argen.serving.service import GenerationService, JobSpec, Overloaded, ShuttingDown
from argen.utils.errors import ArgenError

_ERRORS = {406: "PNG-only Accept for several images", 413: "too many images or too large a body",
           415: "not JSON", 422: "invalid request", 499: "client gone", 503: "queue full or shutting down"}
_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": GenerateRequest.model_json_schema()}}}}
_RESPONSES = {200: {"content": {"image/png": {}}, "description": "JSON answer, or one PNG for Accept: image/png"},
              **{code: {"description": text} for code, text in _ERRORS.items()}}


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when it says so)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise RequestError(415, f"send the request as JSON with content-type: application/json, not {kind}")
    return await read_upload(request, limit)


def _defaults(service: GenerationService) -> dict:
    """The sampling settings a request gets when it names none (read back from the request parser)."""
    probe = {"classes": [0]} if "classes" in service.accepts() else {"prompts": ["probe"]}
    try:
        _, params = parse_request(json.dumps(probe).encode(), service)
    except RequestError:
        return {}
    keep = ("cfg_scale", "cfg_interval", "cfg_schedule", "cfg_power", "temperature", "top_k", "top_p")
    return {k: params[k] for k in keep if k in params}


def served_model(service: GenerationService, model_id: str | None = None,
                 class_names: list[str] | None = None) -> list[ServedModel]:
    """The served models: the base, then `BASE:NAME` for each LoRA adapter (its own classes and names)."""
    cfg = service.gpt.config
    c2i = cfg.kind == "c2i"
    base_id = model_id or cfg.name
    common = dict(kind=cfg.kind, image_size=cfg.image_size, accepts=service.accepts(), defaults=_defaults(service),
                  max_images=service.config.max_images_per_request)
    base_names = list(class_names) if c2i and class_names else None
    models = [ServedModel(id=base_id, num_classes=cfg.num_classes if c2i else None, class_names=base_names, **common)]
    lora = multi_lora(service.gpt)
    for k, name in enumerate(service.adapter_names):
        classes = service.num_classes(k) if c2i else None
        names = lora.served[k].get("class_names") if c2i else None
        if c2i and names is None and classes == cfg.num_classes:
            names = base_names  # the base's classes, adapted
        models.append(ServedModel(id=f"{base_id}:{name}", num_classes=classes,
                                  class_names=list(names) if names and len(names) == classes else None,
                                  adapter=name, base=base_id, **common))
    return models


def _page() -> str:
    return resources.files("argen.serving").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(service: GenerationService, manage_service: bool = True, model_id: str | None = None,
               class_names: list[str] | None = None) -> FastAPI:
    """The HTTP app. With manage_service the app starts the worker and drains it on shutdown. `model_id`
    (default: the config name) and `class_names` (c2i, one per class id) are what the OpenAI endpoints
    and the web page show and accept."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_service:
            service.start()
        yield
        if manage_service:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="argen", lifespan=lifespan)
    app.state.service = service
    served = served_model(service, model_id, class_names)  # the base first, then its adapters
    page = _page()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        cfg, limits = service.gpt.config, service.config
        model = {"num_classes": cfg.num_classes} if cfg.kind == "c2i" else {"caption_len": cfg.caption_len,
                                                                            "caption_dim": cfg.caption_dim}
        return {"status": "shutting_down" if service.closing else "ok", "kind": cfg.kind, "model": cfg.name,
                "image_size": cfg.image_size, "tokens": cfg.num_image_tokens, **model, "accepts": service.accepts(),
                "device": str(service.device), "queue_depth": service.queue_depth(),
                "max_batch_size": limits.max_batch_size, "max_images_per_request": limits.max_images_per_request,
                "max_body_bytes": limits.max_body_bytes, "scheduler": limits.scheduler, "decode": limits.decode,
                "window": limits.window, "tree": limits.tree, "adapters": service.adapter_names}

    @app.get("/metrics")
    async def metrics():
        return service.metrics()

    async def admit(request: Request):
        """Read and check the request -> (JobSpec, params, whether to answer with a PNG)."""
        body = await _read_body(request, service.config.max_body_bytes)
        spec, params = await asyncio.to_thread(parse_request, body, service)  # big feature payloads parse off-loop
        return spec, params, wants_png(request.headers.get("accept"), len(spec.conditions))

    async def run_job(request: Request, spec) -> dict | RequestError:
        """Queue the job and wait for it -> the service's result, or the error to answer with."""
        try:
            job = service.submit(spec)
        except (Overloaded, ShuttingDown) as exc:
            return RequestError(503, str(exc))
        except ArgenError as exc:
            return RequestError(422, str(exc))
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    service.cancel(job)
                    return RequestError(499, "client disconnected")
        except asyncio.CancelledError:
            service.cancel(job)
            raise
        if waiter.cancelled():
            return RequestError(499, "request cancelled")
        error = waiter.exception()
        if error is not None:
            return RequestError(422 if isinstance(error, ArgenError) else 500, f"generation failed: {error}")
        return waiter.result()

    async def argen_job(request: Request, prepare, answer):
        """Run an argen API request: `prepare()` -> (JobSpec, what `answer` needs) or a RequestError;
        `answer(result, prepared)` shapes the reply; errors are argen's one-line JSON."""
        try:
            spec, *prepared = await prepare()
        except RequestError as exc:
            service.count_invalid()
            return _error(exc.status, exc.message)
        except ClientDisconnect:
            return _error(499, "client disconnected")
        result = await run_job(request, spec)
        if isinstance(result, RequestError):
            return _error(result.status, result.message)
        return answer(result, *prepared)

    def images_json(result: dict, params: dict) -> dict:
        return {"images": [base64.b64encode(png).decode("ascii") for png in result["png"]],
                "codes": result["codes"], "params": params, "timings": result["timings"]}

    @app.post("/v1/generate", openapi_extra=_OPENAPI, responses=_RESPONSES)
    async def generate(request: Request):
        def answer(result, params, as_png):
            if as_png:
                headers = {"X-Argen-Params": json.dumps(params), "X-Argen-Timings": json.dumps(result["timings"])}
                return Response(result["png"][0], media_type="image/png", headers=headers)
            return images_json(result, params)

        return await argen_job(request, lambda: admit(request), answer)

    def _openai_error(exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/v1/models")
    async def models():
        return models_answer(served)

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        try:
            return models_answer(pick_model(served, name))["data"][0]
        except OpenAIError as exc:
            return _openai_error(exc)

    @app.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ImagesRequest.model_json_schema()}}}})
    async def images_generations(request: Request):
        async def prepare():
            try:
                body = parse_images_request(await _read_body(request, service.config.max_body_bytes))
                generate_body, revised = to_generate_body(body, served)
                spec, _ = await asyncio.to_thread(parse_request, generate_body, service)
            except RequestError as exc:
                raise OpenAIError(400 if exc.status == 422 else exc.status, exc.message) from None
            return spec, revised

        return await openai_images(request, prepare)

    async def openai_images(request: Request, prepare):
        """Run an OpenAI images request: `prepare()` -> (JobSpec, revised prompts) or an OpenAIError; the
        job's PNGs in OpenAI's answer, its errors in OpenAI's shape (a 422 from argen becomes a 400)."""
        try:
            spec, revised = await prepare()
        except OpenAIError as exc:
            service.count_invalid()
            return _openai_error(exc)
        except ClientDisconnect:
            return _openai_error(OpenAIError(499, "client disconnected"))
        result = await run_job(request, spec)
        if isinstance(result, RequestError):
            return _openai_error(OpenAIError(400 if result.status == 422 else result.status, result.message))
        return images_answer(result["png"], revised)

    async def edit_spec(generate_body: bytes, image: bytes, mask: bytes | None, box=None, fields_status: int = 422):
        """The edit's JobSpec (the generate request's, with the forced tokens), its params and EditInput.
        A bad image or mask is a 422; other invalid fields get `fields_status` (OpenAI's 400)."""
        try:
            spec, params = await asyncio.to_thread(parse_request, generate_body, service)
        except RequestError as exc:
            raise RequestError(fields_status if exc.status == 422 else exc.status, exc.message) from None
        edit = await asyncio.to_thread(prepare_edit, service, image, mask, box)
        return JobSpec(spec.conditions, spec.params, spec.seed, forced=edit.forced, adapter=spec.adapter), params, edit

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        async def prepare():
            try:
                body = await read_upload(request, service.config.max_body_bytes)
                generate_body, revised, image, mask = await parse_openai_edit(body, request.headers, served)
                spec, _, _ = await edit_spec(generate_body, image, mask, fields_status=400)
            except RequestError as exc:
                raise OpenAIError(exc.status, exc.message, "image" if exc.status == 422 else None) from None
            return spec, revised

        return await openai_images(request, prepare)

    @app.post("/v1/edit")
    async def argen_edit(request: Request):
        async def prepare():
            body = await _read_body(request, service.config.max_body_bytes)
            generate_body, image, mask, box = parse_argen_edit(body)
            return await edit_spec(generate_body, image, mask, box)

        return await argen_job(request, prepare, lambda result, params, edit: {**images_json(result, params),
                                                                                **edit.echo()})

    return app
