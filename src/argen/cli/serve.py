"""Serve the generation engine over HTTP (FastAPI + uvicorn): continuous batching, OpenAI images API, web page.

    argen serve --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 --gpt c2i_B_256.pt --gpt-config GPT-B \\
                --kind c2i --image-size 256 --device cuda --dtype bf16 --port 8000
    curl -s localhost:8000/v1/generate -H 'content-type: application/json' -d '{"classes": [207], "seed": 1}'

    argen serve --gpt c2i_B_256 --port 8000      # a released name: the flags and the tokenizer follow from it
    argen serve --gpt c2i_B_256 --lora dogs=runs/dogs --lora logos=hf://me/logos
                                                 # c2i_B_256, c2i_B_256:dogs and c2i_B_256:logos, one batch

The web page is at http://localhost:8000/, the OpenAI images API at /v1/images/generations and /v1/models
(see argen.serving.app).
POST /v1/generate takes {"classes": [..]}, {"prompts": [..]} or {"features": .., "mask": ..} plus optional n,
cfg_scale, cfg_interval, cfg_schedule, cfg_power, top_k, top_p, temperature, seed; GET /health and GET /metrics
report state. t2i models encode prompts with --text-encoder (default minilm); `--text-encoder none` serves
precomputed caption features only. The encoder's width is checked against the generator before the server
starts. Ctrl-C / SIGTERM finish in-flight work. Details: docs/engine.md.
"""

from __future__ import annotations

import argparse
import errno
import socket

from argen.cli.common import (
    add_checkpoint_arguments,
    int_range,
    load_models,
    nonneg_float,
    positive_float,
    positive_int,
    say_bundled_generator,
    use_bundled_generator,
)
from argen.utils.errors import ArgenError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    group.add_argument("--port", type=int_range(1, 65535), default=8000, help="port (default 8000)")
    group.add_argument("--max-batch-size", type=positive_int, default=16, help="images per engine batch (default 16)")
    group.add_argument("--scheduler", choices=["continuous", "static"], default="continuous",
                       help="continuous (default): --max-batch-size slots, new requests join at the next token "
                            "step; static: batches run to the end")
    group.add_argument("--decode", choices=["ar", "jacobi"], default="ar",
                       help="ar (default): one token per forward pass; jacobi: speculative Jacobi decoding for every "
                            "request (same distribution, fewer forward passes, other images per seed), with either "
                            "scheduler")
    group.add_argument("--window", type=positive_int, default=None,
                       help="with --decode jacobi: positions per forward pass (default 8)")
    group.add_argument("--tree", default=None, metavar="KxD[xG]",
                       help="with --decode jacobi: a draft tree for every request (e.g. 4x2: K candidates per "
                            "unverified token, each followed by D tokens, in the same forward pass; for GPUs: "
                            "slower than none on a CPU)")
    group.add_argument("--max-wait-ms", type=nonneg_float, default=10.0,
                       help="how long the oldest request waits for others to join its batch (default 10)")
    group.add_argument("--max-queue", type=positive_int, default=256, help="queued images before 503 (default 256)")
    group.add_argument("--max-images-per-request", type=positive_int, default=16,
                       help="larger requests get 413 (default 16)")
    group.add_argument("--max-body-mb", type=positive_float, default=32.0,
                       help="larger request bodies get 413 (default 32; caption features are the big ones)")
    group.add_argument("--decode-chunk", type=positive_int, default=None,
                       help="images per tokenizer-decoder call, the last call padded (default: 8, or 1 for CPU "
                            "images above 128 px); fixed so that an image's pixels do not depend on its co-tenants")
    group.add_argument("--overlap-decode", choices=["auto", "on", "off"], default="auto",
                       help="decode images on a second thread while the next batch generates (auto: on for CUDA)")
    group.add_argument("--text-encoder", default="minilm",
                       help="t2i only: 'minilm' (default), a local transformers folder (e.g. flan-t5-xl), or 'none' "
                            "to accept precomputed caption features only")
    group.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


def check_port_free(host: str, port: int) -> None:
    """Refuse at once, in one line, a host/port the server could not listen on (checked before the
    models load; uvicorn would otherwise fail after loading them, with its own multi-line log)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ArgenError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ArgenError(f"port {port} on {host} is already in use; stop the process that holds it or "
                                 f"choose another --port") from None
            raise ArgenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from argen.serving import GenerationService, ServeConfig, create_app

    if args.max_body_mb > 4096:
        raise ArgenError(f"--max-body-mb must lie in (0, 4096], got {args.max_body_mb}")
    check_port_free(args.host, args.port)
    config = ServeConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_images_per_request=args.max_images_per_request, decode_chunk=args.decode_chunk,
                         overlap_decode={"auto": None, "on": True, "off": False}[args.overlap_decode],
                         max_body_bytes=int(args.max_body_mb * (1 << 20)), scheduler=args.scheduler,
                         decode=args.decode, window=args.window, tree=args.tree)
    bundled = use_bundled_generator(args, args.kind or "t2i")
    args.adapters, args.lora = args.lora, None  # served side by side (batched LoRA), not merged
    tokenizer, gpt, device, _ = load_models(args)
    if bundled:
        say_bundled_generator(args.gpt, gpt)
    encode, conditions = None, "classes"
    if gpt.config.kind == "t2i":
        conditions = "caption features only"
        if args.text_encoder.lower() != "none":
            from argen.serving.text import prompt_encoder

            encode = prompt_encoder(gpt, args.text_encoder, device)  # refuses a width mismatch here
            conditions = f"prompts ({args.text_encoder}) or caption features"
    try:
        import uvicorn
    except ImportError:
        raise ArgenError("argen serve needs uvicorn: pip install uvicorn") from None
    from argen.checkpoint.hub import gpt_class_names, model_id

    service = GenerationService(tokenizer, gpt, config, encode_prompts=encode)
    names = getattr(gpt, "class_names", None) or (gpt_class_names(args.gpt, gpt.config.num_classes)
                                                  if gpt.config.kind == "c2i" else None)
    served_id = model_id(args.gpt)
    app = create_app(service, model_id=served_id, class_names=names)  # and BASE:NAME for each adapter
    names_served = service.adapter_names
    adapters = f", LoRA adapters {', '.join(f'{served_id}:{n}' for n in names_served)}" if names_served else ""
    print(f"argen serve: {gpt.config.kind} {gpt.config.name} ({gpt.config.num_image_tokens} tokens) on {device}, "
          f"takes {conditions}{adapters}; http://{args.host}:{args.port}/v1/generate, OpenAI API at "
          f"http://{args.host}:{args.port}/v1, web page at http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
