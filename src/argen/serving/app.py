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
The app starts the service's worker on startup and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from argen.serving.request import GenerateRequest, RequestError, parse_request, wants_png
from argen.serving.service import GenerationService, Overloaded, ShuttingDown
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
    declared = request.headers.get("content-length", "")
    too_big = f"the request body is over {limit} bytes, the limit of this server (--max-body-mb)"
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: GenerationService, manage_service: bool = True) -> FastAPI:
    """The HTTP app. With manage_service the app starts the worker and drains it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_service:
            service.start()
        yield
        if manage_service:
            await asyncio.to_thread(service.close)

    app = FastAPI(title="argen", lifespan=lifespan)
    app.state.service = service

    @app.get("/health")
    async def health():
        cfg, limits = service.gpt.config, service.config
        model = {"num_classes": cfg.num_classes} if cfg.kind == "c2i" else {"caption_len": cfg.caption_len,
                                                                            "caption_dim": cfg.caption_dim}
        return {"status": "shutting_down" if service.closing else "ok", "kind": cfg.kind, "model": cfg.name,
                "image_size": cfg.image_size, "tokens": cfg.num_image_tokens, **model, "accepts": service.accepts(),
                "device": str(service.device), "queue_depth": service.queue_depth(),
                "max_batch_size": limits.max_batch_size, "max_images_per_request": limits.max_images_per_request,
                "max_body_bytes": limits.max_body_bytes}

    @app.get("/metrics")
    async def metrics():
        return service.metrics()

    async def admit(request: Request):
        """Read and check the request -> (JobSpec, params, whether to answer with a PNG)."""
        body = await _read_body(request, service.config.max_body_bytes)
        spec, params = await asyncio.to_thread(parse_request, body, service)  # big feature payloads parse off-loop
        return spec, params, wants_png(request.headers.get("accept"), len(spec.conditions))

    @app.post("/v1/generate", openapi_extra=_OPENAPI, responses=_RESPONSES)
    async def generate(request: Request):
        try:
            spec, params, as_png = await admit(request)
        except RequestError as exc:
            service.count_invalid()
            return _error(exc.status, exc.message)
        except ClientDisconnect:
            return _error(499, "client disconnected")
        try:
            job = service.submit(spec)
        except (Overloaded, ShuttingDown) as exc:
            return _error(503, str(exc))
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    service.cancel(job)
                    return _error(499, "client disconnected")
        except asyncio.CancelledError:
            service.cancel(job)
            raise
        if waiter.cancelled():
            return _error(499, "request cancelled")
        error = waiter.exception()
        if error is not None:
            status = 422 if isinstance(error, ArgenError) else 500
            return _error(status, f"generation failed: {error}")
        result = waiter.result()
        if as_png:
            headers = {"X-Argen-Params": json.dumps(params), "X-Argen-Timings": json.dumps(result["timings"])}
            return Response(result["png"][0], media_type="image/png", headers=headers)
        return {"images": [base64.b64encode(png).decode("ascii") for png in result["png"]],
                "codes": result["codes"], "params": params, "timings": result["timings"]}

    return app
