"""FastAPI application over a `GenerationService`.

Endpoints:
- `POST /v1/generate`: JSON `{"classes": [..]}` (c2i) or `{"prompts": [..]}` (t2i), optional `n`
  (images per class/prompt, default 1), `cfg_scale`, `cfg_interval`, `cfg_schedule`, `cfg_power`,
  `top_k`, `top_p`, `temperature`, `seed`. Answers `{"images": [base64 PNG], "codes": [[..]],
  "params": {..}, "timings": {..}}`, or the PNG itself for `Accept: image/png` and one image.
  422: invalid request (with a message); 413: more images than `max_images_per_request`;
  503: queue full or shutting down; 499: the client went away (its queued work is dropped).
- `GET /health`: model and queue summary. `GET /metrics`: counters, queue depth, images/s,
  latency p50/p99 (see `GenerationService.metrics`).
The app starts the service's worker on startup and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from argen.sampling.logits import SamplingParams
from argen.serving.service import GenerationService, JobSpec, Overloaded, ShuttingDown
from argen.utils.errors import ArgenError

DEFAULTS = {"c2i": {"cfg_scale": 4.0, "top_k": 2000}, "t2i": {"cfg_scale": 7.5, "top_k": 1000}}
MAX_PROMPT_CHARS = 2000


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: list[int] | None = None
    prompts: list[str] | None = None
    n: int = Field(1, ge=1, description="images per class id / prompt")
    cfg_scale: float | None = None
    cfg_interval: int = -1
    cfg_schedule: str = "constant"
    cfg_power: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = Field(None, ge=0, lt=2**63)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def build_spec(body: GenerateRequest, service: GenerationService) -> JobSpec:
    """Validate a request against the model and limits; raises RequestError."""
    cfg = service.gpt.config
    if (body.classes is None) == (body.prompts is None):
        raise RequestError(422, "give exactly one of `classes` (class-conditional) or `prompts` (text-conditional)")
    if cfg.kind == "c2i" and body.classes is None:
        raise RequestError(422, "this server runs a class-conditional model: send `classes`")
    if cfg.kind == "t2i" and body.prompts is None:
        raise RequestError(422, "this server runs a text-conditional model: send `prompts`")
    conditions = body.classes if body.classes is not None else body.prompts
    if not conditions:
        raise RequestError(422, "`classes`/`prompts` is empty")
    total = len(conditions) * body.n
    limit = service.config.max_images_per_request
    if total > limit:
        raise RequestError(413, f"{total} images requested; this server allows at most {limit} per request")
    if body.classes is not None:
        bad = [c for c in body.classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise RequestError(422, f"class ids must lie in [0, {cfg.num_classes - 1}], got {bad[:5]}")
    else:
        if any(not p.strip() for p in body.prompts):
            raise RequestError(422, "prompts must be non-empty strings")
        if any(len(p) > MAX_PROMPT_CHARS for p in body.prompts):
            raise RequestError(422, f"prompts must be at most {MAX_PROMPT_CHARS} characters")
    defaults = DEFAULTS[cfg.kind]
    try:
        params = SamplingParams(
            cfg_scale=defaults["cfg_scale"] if body.cfg_scale is None else body.cfg_scale,
            cfg_interval=body.cfg_interval, cfg_schedule=body.cfg_schedule, cfg_power=body.cfg_power,
            temperature=body.temperature, top_k=defaults["top_k"] if body.top_k is None else body.top_k,
            top_p=body.top_p)
    except ArgenError as exc:
        raise RequestError(422, str(exc)) from None
    seed = secrets.randbits(62) if body.seed is None else body.seed
    expanded = [c for c in conditions for _ in range(body.n)]
    return JobSpec(expanded, params, seed)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        service.count_invalid()
        parts = ["{}: {}".format(".".join(str(x) for x in e.get("loc", ()) if x != "body"), e.get("msg"))
                 for e in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.get("/health")
    async def health():
        cfg = service.gpt.config
        return {"status": "shutting_down" if service.closing else "ok", "kind": cfg.kind, "model": cfg.name,
                "image_size": cfg.image_size, "tokens": cfg.num_image_tokens, "device": str(service.device),
                "queue_depth": service.queue_depth(), "max_batch_size": service.config.max_batch_size}

    @app.get("/metrics")
    async def metrics():
        return service.metrics()

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        try:
            spec = build_spec(body, service)
        except RequestError as exc:
            if exc.status == 422 or exc.status == 413:
                service.count_invalid()
            return _error(exc.status, exc.message)
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
        params = {**spec.params.to_dict(), "seed": spec.seed, "n": body.n}
        if body.classes is not None:
            params["classes"] = body.classes
        else:
            params["prompts"] = body.prompts
        accept = request.headers.get("accept", "")
        if "image/png" in accept and len(result["png"]) == 1:
            headers = {"X-Argen-Params": json.dumps(params), "X-Argen-Timings": json.dumps(result["timings"])}
            return Response(result["png"][0], media_type="image/png", headers=headers)
        return {"images": [base64.b64encode(png).decode("ascii") for png in result["png"]],
                "codes": result["codes"], "params": params, "timings": result["timings"]}

    return app
