"""`argen serve`: the HTTP app and its batching service, in process, on tiny random models.

Covers mixed-parameter batching, seed isolation, validation (422/413), overload (503),
cancellation of queued work on disconnect, and graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from argen.checkpoint import load_gpt, load_tokenizer, save_gpt, save_tokenizer
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQModel, vq_config
from argen.sampling import reference_generate
from argen.sampling.logits import SamplingParams
from argen.serving import GenerationService, JobSpec, ServeConfig, ShuttingDown, create_app
from argen.serving.service import Overloaded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-tiny-16")), root / "vq")
    for kind in ("c2i", "t2i"):
        gpt = GPT(gpt_config("GPT-tiny", kind=kind))
        torch.nn.init.normal_(gpt.output.weight, std=0.5)
        save_gpt(gpt, root / kind)
    return root


def make_service(checkpoints, kind="c2i", **config) -> GenerationService:
    tokenizer = load_tokenizer(checkpoints / "vq")
    gpt = load_gpt(checkpoints / kind)
    encode = fake_prompt_encoder(gpt) if kind == "t2i" else None
    return GenerationService(tokenizer, gpt, ServeConfig(**config), encode_prompts=encode)


def fake_prompt_encoder(gpt):
    """Deterministic stand-in for a text encoder: features from a hash of each prompt."""
    cfg = gpt.config

    def encode(prompts):
        feats = torch.zeros(len(prompts), cfg.caption_len, cfg.caption_dim)
        mask = torch.zeros(len(prompts), cfg.caption_len)
        for i, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(map(ord, prompt)))
            n = min(cfg.caption_len, len(prompt.split()) + 1)
            feats[i, -n:] = torch.randn(n, cfg.caption_dim, generator=g)
            mask[i, -n:] = 1
        return feats, mask

    return encode


@pytest.fixture
def client(checkpoints):
    service = make_service(checkpoints, max_batch_size=8, max_wait_ms=5, max_queue=32, max_images_per_request=6)
    with TestClient(create_app(service)) as c:
        yield c


def decode_png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


# ------------------------------------------------------------------------- basics
def test_generate_returns_images_codes_params_and_timings(client):
    r = client.post("/v1/generate", json={"classes": [1, 2], "n": 2, "seed": 3, "top_k": 50, "cfg_scale": 2.0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 4 and len(body["codes"]) == 4
    assert all(len(c) == 16 and all(0 <= t < 512 for t in c) for c in body["codes"])
    assert decode_png(body["images"][0]).shape == (64, 64, 3)
    assert body["params"]["top_k"] == 50 and body["params"]["cfg_scale"] == 2.0 and body["params"]["seed"] == 3
    assert body["params"]["classes"] == [1, 2]
    assert body["timings"]["total_ms"] >= body["timings"]["generate_ms"] > 0
    again = client.post("/v1/generate", json={"classes": [1, 2], "n": 2, "seed": 3, "top_k": 50, "cfg_scale": 2.0})
    assert again.json()["codes"] == body["codes"]
    other = client.post("/v1/generate", json={"classes": [1, 2], "n": 2, "seed": 4, "top_k": 50, "cfg_scale": 2.0})
    assert other.json()["codes"] != body["codes"]


def test_png_response_for_one_image_and_health_and_metrics(client):
    r = client.post("/v1/generate", json={"classes": [5], "seed": 1}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array(Image.open(io.BytesIO(r.content))).shape == (64, 64, 3)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["kind"] == "c2i" and health["tokens"] == 16
    metrics = client.get("/metrics").json()
    assert metrics["completed_total"] >= 1 and metrics["images_total"] >= 1
    assert metrics["latency_ms"]["p50"] > 0 and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]
    assert metrics["queue_depth"] == 0


def test_greedy_request_matches_reference_sampler(client, checkpoints):
    body = client.post("/v1/generate", json={"classes": [3, 7], "top_k": 1, "cfg_scale": 3.0}).json()
    gpt = load_gpt(checkpoints / "c2i")
    expected = reference_generate(gpt, torch.tensor([3, 7]), cfg_scale=3.0, top_k=1)
    assert body["codes"] == expected.tolist()


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize("payload, status, fragment", [
    ({}, 422, "exactly one"),
    ({"classes": [1], "prompts": ["a cat"]}, 422, "exactly one"),
    ({"prompts": ["a cat"]}, 422, "class-conditional"),
    ({"classes": [10]}, 422, "class ids"),
    ({"classes": []}, 422, "empty"),
    ({"classes": [1], "top_p": 0}, 422, "top_p"),
    ({"classes": [1], "temperature": -1}, 422, "temperature"),
    ({"classes": [1], "cfg_schedule": "cosine"}, 422, "cfg_schedule"),
    ({"classes": [1], "n": 0}, 422, "n"),
    ({"classes": [1], "bogus": 1}, 422, "bogus"),
    ({"classes": ["x"]}, 422, "classes"),
    ({"classes": [1, 2], "n": 4}, 413, "at most 6"),
])
def test_invalid_requests_are_refused_with_a_message(client, payload, status, fragment):
    r = client.post("/v1/generate", json=payload)
    assert r.status_code == status
    assert fragment in r.json()["error"]


def test_invalid_json_is_422(client):
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid request" in r.json()["error"]


# ------------------------------------------------------------------------- batching
async def _post_all(app, payloads, service, expect_rows):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
        tasks = [asyncio.create_task(ac.post("/v1/generate", json=p)) for p in payloads]
        for _ in range(500):
            if service.queue_depth() >= expect_rows:
                break
            await asyncio.sleep(0.01)
        assert service.queue_depth() == expect_rows
        service.resume()
        return await asyncio.gather(*tasks)


def test_mixed_parameters_share_a_batch_without_leaking(checkpoints):
    service = make_service(checkpoints, max_batch_size=16, max_wait_ms=1, max_queue=64, max_images_per_request=8)
    app = create_app(service, manage_service=False)
    payloads = [
        {"classes": [1], "seed": 11, "top_k": 1, "cfg_scale": 3.0},  # greedy, guided
        {"classes": [2, 3], "seed": 12, "temperature": 1.5, "top_p": 0.7, "cfg_scale": 1.0},
        {"classes": [4], "n": 2, "seed": 13, "top_k": 20, "cfg_scale": 5.0, "cfg_interval": 4},
        {"classes": [5], "seed": 14, "top_k": 0, "cfg_scale": 2.0, "cfg_schedule": "linear"},
    ]
    alone = []
    service.start()
    try:
        for p in payloads:  # each request on its own
            service.pause()
            alone.append(asyncio.run(_post_all(app, [p], service, len(p["classes"]) * p.get("n", 1)))[0].json())
        service.pause()
        together = asyncio.run(_post_all(app, payloads, service, 6))
    finally:
        service.close()
    for solo, shared in zip(alone, together):
        assert shared.status_code == 200
        body = shared.json()
        assert body["timings"]["batch_images"] == [6]  # all four requests ran as one batch
        assert body["codes"] == solo["codes"]  # same seed, same images, whatever shares the batch
        assert body["params"] == solo["params"]
    gpt = load_gpt(checkpoints / "c2i")
    greedy = reference_generate(gpt, torch.tensor([1]), cfg_scale=3.0, top_k=1)
    assert together[0].json()["codes"] == greedy.tolist()


def test_t2i_prompts_with_seed_isolation(checkpoints):
    service = make_service(checkpoints, kind="t2i", max_batch_size=8, max_wait_ms=1, max_images_per_request=4)
    app = create_app(service, manage_service=False)
    a = {"prompts": ["a red bird on a branch"], "seed": 5, "top_k": 30}
    b = {"prompts": ["x", "a much longer prompt about a boat at sea"], "seed": 6, "cfg_scale": 2.0}
    service.start()
    try:
        service.pause()
        solo = asyncio.run(_post_all(app, [a], service, 1))[0]
        service.pause()
        shared = asyncio.run(_post_all(app, [a, b], service, 3))
    finally:
        service.close()
    assert solo.status_code == 200 and shared[0].status_code == 200 and shared[1].status_code == 200
    assert shared[0].json()["codes"] == solo.json()["codes"]
    assert shared[0].json()["params"]["prompts"] == a["prompts"]


def test_prompts_sent_to_class_model_and_classes_to_text_model_are_422(checkpoints):
    service = make_service(checkpoints, kind="t2i")
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json={"classes": [1]})
        assert r.status_code == 422 and "text-conditional" in r.json()["error"]


# ------------------------------------------------------------------------- overload, cancel, shutdown
def test_full_queue_answers_503_then_recovers(checkpoints):
    service = make_service(checkpoints, max_batch_size=4, max_wait_ms=1, max_queue=3, max_images_per_request=3)
    service.start()
    service.pause()
    try:
        held = service.submit(JobSpec([1, 2, 3], SamplingParams(top_k=5), seed=0))
        app = create_app(service, manage_service=False)

        async def overflow():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
                return await ac.post("/v1/generate", json={"classes": [1]})

        r = asyncio.run(overflow())
        assert r.status_code == 503 and "queue is full" in r.json()["error"]
        assert service.metrics()["rejected_overload_total"] == 1
        service.resume()
        assert len(held.future.result(timeout=60)["codes"]) == 3
    finally:
        service.close()


def test_client_disconnect_cancels_queued_work(checkpoints):
    service = make_service(checkpoints, max_batch_size=4, max_wait_ms=1)
    app = create_app(service, manage_service=False)
    service.start()
    service.pause()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            task = asyncio.create_task(ac.post("/v1/generate", json={"classes": [1, 2], "seed": 1}))
            for _ in range(500):
                if service.queue_depth() == 2:
                    break
                await asyncio.sleep(0.01)
            assert service.queue_depth() == 2
            task.cancel()  # the client goes away
            with pytest.raises(asyncio.CancelledError):
                await task
            assert service.queue_depth() == 0
            service.resume()
            return await ac.post("/v1/generate", json={"classes": [3], "seed": 2})

    try:
        after = asyncio.run(scenario())
    finally:
        service.close()
    assert after.status_code == 200
    metrics = service.metrics()
    assert metrics["cancelled_total"] == 1
    assert metrics["batched_images_total"] == 1  # the cancelled rows never ran


@pytest.mark.parametrize("overlap", [False, True])
def test_shutdown_finishes_queued_and_running_work(checkpoints, overlap):
    service = make_service(checkpoints, max_batch_size=2, max_wait_ms=1, max_queue=16, overlap_decode=overlap)
    service.start()
    service.pause()
    jobs = [service.submit(JobSpec([i % 10], SamplingParams(top_k=10), seed=i)) for i in range(5)]
    closer = threading.Thread(target=service.close)
    closer.start()
    results = [job.future.result(timeout=60) for job in jobs]
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert all(len(r["codes"]) == 1 for r in results)
    with pytest.raises(ShuttingDown):
        service.submit(JobSpec([1], SamplingParams(), seed=0))
    with pytest.raises(Overloaded):
        overloaded = make_service(checkpoints, max_queue=1, max_images_per_request=1)
        overloaded.submit(JobSpec([1, 2], SamplingParams(), seed=0))


# ------------------------------------------------------------------------- CLI and text encoder
def test_serve_config_limits_are_checked():
    from argen.utils.errors import ArgenError

    with pytest.raises(ArgenError, match="max-batch-size"):
        ServeConfig(max_batch_size=0)
    with pytest.raises(ArgenError, match="cannot exceed"):
        ServeConfig(max_queue=4, max_images_per_request=8)


def test_cli_serve_builds_the_app_from_checkpoint_flags(checkpoints, monkeypatch, capsys):
    import uvicorn

    from argen.cli.main import main

    served = {}

    def fake_run(app, host, port, log_level):
        served.update(host=host, port=port)
        with TestClient(app) as c:  # runs startup and the graceful shutdown
            served["response"] = c.post("/v1/generate", json={"classes": [2], "seed": 9, "top_k": 1})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    rc = main(["serve", "--tokenizer", str(checkpoints / "vq"), "--gpt", str(checkpoints / "c2i"), "--device", "cpu",
               "--port", "8123", "--max-batch-size", "4"])
    assert rc == 0 and served["port"] == 8123 and served["host"] == "127.0.0.1"
    assert served["response"].status_code == 200 and len(served["response"].json()["codes"][0]) == 16
    assert main(["serve", "--tokenizer", str(checkpoints / "vq"), "--gpt", str(checkpoints / "c2i"),
                 "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.slow
def test_t2i_prompt_encoder_checks_width_and_serves_prompts(tmp_path):
    from argen.serving.text import prompt_encoder
    from argen.utils.errors import ArgenError

    torch.manual_seed(0)
    with pytest.raises(ArgenError, match="384-wide"):
        prompt_encoder(GPT(gpt_config("GPT-tiny", kind="t2i")), "minilm", "cpu")  # caption_dim 32
    gpt = GPT(gpt_config("GPT-tiny", kind="t2i", caption_dim=384)).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    encode = prompt_encoder(gpt, "minilm", "cpu")
    features, mask = encode(["a small red bird", "a boat"])
    assert features.shape == (2, 8, 384) and mask.shape == (2, 8)
    assert mask[1].sum() < mask[0].sum() and mask[:, -1].all()  # left padded
    service = GenerationService(VQModel(vq_config("VQ-tiny-16")).eval(), gpt, ServeConfig(max_wait_ms=1),
                                encode_prompts=encode)
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json={"prompts": ["a small red bird"], "seed": 1})
    assert r.status_code == 200 and len(r.json()["codes"][0]) == 16
