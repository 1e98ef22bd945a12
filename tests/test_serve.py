"""`argen serve`: the HTTP app and its batching service, in process, on tiny random models.

Covers the answer format (keys, codes, params echo, PNG answers), `n` semantics, mixed-parameter
batching, seed isolation, validation (422/413/406/415), precomputed caption features (JSON and
base64 .npy), feature-only t2i servers, overload (503), cancellation of queued work on disconnect,
graceful shutdown, and once a real `argen serve` process on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

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


def test_answer_keys_codes_order_and_params_echo_the_effective_defaults(client, checkpoints):
    r = client.post("/v1/generate", json={"classes": [1, 2], "n": 3, "top_k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "codes", "params", "timings"}
    assert len(body["images"]) == 6 and len(body["codes"]) == 6
    assert all(isinstance(c, list) and len(c) == 16 and all(type(t) is int for t in c) for c in body["codes"])
    seed = body["params"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63  # drawn by the server, echoed
    assert body["params"] == {"cfg_scale": 4.0, "cfg_interval": -1, "cfg_schedule": "constant", "cfg_power": 1.0,
                              "temperature": 1.0, "top_k": 1, "top_p": 1.0, "seed": seed, "n": 3, "images": 6,
                              "classes": [1, 2]}
    assert set(body["timings"]) == {"queue_ms", "generate_ms", "decode_ms", "encode_ms", "total_ms", "batch_images"}
    assert body["timings"]["total_ms"] >= body["timings"]["generate_ms"] > 0
    # n images per class, class by class: greedy decoding makes them equal to the reference per class
    gpt = load_gpt(checkpoints / "c2i")
    expected = reference_generate(gpt, torch.tensor([1, 1, 1, 2, 2, 2]), cfg_scale=4.0, top_k=1)
    assert body["codes"] == expected.tolist()


def test_png_answer_is_chosen_by_accept_header(client):
    r = client.post("/v1/generate", json={"classes": [5], "seed": 1, "top_k": 3}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    params = json.loads(r.headers["x-argen-params"])
    assert params["seed"] == 1 and params["top_k"] == 3 and params["classes"] == [5]
    assert "total_ms" in json.loads(r.headers["x-argen-timings"])
    as_json = client.post("/v1/generate", json={"classes": [5], "seed": 1, "top_k": 3}).json()
    assert base64.b64decode(as_json["images"][0]) == r.content  # same image either way
    r = client.post("/v1/generate", json={"classes": [5, 6]}, headers={"accept": "image/png"})
    assert r.status_code == 406 and "one image" in r.json()["error"]
    r = client.post("/v1/generate", json={"classes": [5, 6]}, headers={"accept": "image/png, application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    r = client.post("/v1/generate", json={"classes": [5]}, headers={"accept": "application/json, image/png;q=0.5"})
    assert r.headers["content-type"] == "application/json"


def test_png_response_for_one_image_and_health_and_metrics(client):
    r = client.post("/v1/generate", json={"classes": [5], "seed": 1}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array(Image.open(io.BytesIO(r.content))).shape == (64, 64, 3)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["kind"] == "c2i" and health["tokens"] == 16
    assert (health["scheduler"], health["decode"], health["window"]) == ("continuous", "ar", None)
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


@pytest.mark.parametrize("payload, fragment", [
    ({"classes": [True]}, "classes.0"),  # strict types: no bools, floats or strings for integers
    ({"classes": [1.0]}, "classes.0"),
    ({"classes": ["3"]}, "classes.0"),
    ({"classes": 1}, "classes"),
    ({"classes": [1], "n": "2"}, "n"),
    ({"classes": [1], "n": -1}, "n"),
    ({"classes": [-1]}, "class ids"),
    ({"classes": [1], "top_p": 1.5}, "top_p"),
    ({"classes": [1], "top_p": -0.1}, "top_p"),
    ({"classes": [1], "temperature": 0}, "temperature"),
    ({"classes": [1], "top_k": -1}, "top_k"),
    ({"classes": [1], "cfg_interval": -2}, "cfg_interval"),
    ({"classes": [1], "cfg_scale": -1.0}, "cfg_scale"),
    ({"classes": [1], "cfg_scale": 1e308}, "cfg_scale must lie in [0, 10000]"),
    ({"classes": [1], "seed": -1}, "seed"),
    ({"classes": [1], "seed": 2**63}, "seed"),
    ([1, 2], "object"),
    ({"features": [[[0.0] * 32]]}, "class-conditional"),
    ({"classes": [1], "mask": [[1]]}, "`mask` goes with `features`"),
])
def test_bad_types_and_values_are_422(client, payload, fragment):
    r = client.post("/v1/generate", json=payload)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]
    assert client.get("/metrics").json()["rejected_invalid_total"] >= 1


def test_non_finite_numbers_are_422(client):
    for text in ('{"classes": [1], "cfg_power": Infinity}', '{"classes": [1], "cfg_scale": NaN}'):
        r = client.post("/v1/generate", content=text.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422 and "finite" in r.json()["error"], r.text


def test_oversized_body_is_413_and_non_json_content_type_is_415(checkpoints):
    service = make_service(checkpoints, max_wait_ms=1, max_body_bytes=2000)
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json={"classes": [1] * 1000})
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]
        r = c.post("/v1/generate", content=b'{"classes": [1]}', headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]
        r = c.post("/v1/generate", content=b'{"classes": [1]}')  # no content type: read as JSON
        assert r.status_code == 200


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


@pytest.mark.repro
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


@pytest.mark.repro
def test_prompts_and_features_share_a_batch_without_leaking(checkpoints):
    service = make_service(checkpoints, kind="t2i", max_batch_size=8, max_wait_ms=1, max_images_per_request=4)
    app = create_app(service, manage_service=False)
    rng = np.random.default_rng(1)
    c = {"features": npy_b64(rng.standard_normal((2, 5, 32)).astype(np.float32)), "seed": 7, "top_k": 40}
    a = {"prompts": ["a red bird on a branch"], "seed": 5, "top_k": 30, "cfg_scale": 2.0}
    d = {"features": [rng.standard_normal((2, 32)).tolist()], "seed": 8, "temperature": 0.7}
    payloads = [c, a, d]  # rows: caption, caption, prompt, caption
    service.start()
    try:
        solo = []
        for p in payloads:
            service.pause()
            solo.append(asyncio.run(_post_all(app, [p], service, 2 if p is c else 1))[0])
        service.pause()
        shared = asyncio.run(_post_all(app, payloads, service, 4))
    finally:
        service.close()
    for alone, together in zip(solo, shared):
        assert alone.status_code == 200 and together.status_code == 200, together.text
        assert together.json()["timings"]["batch_images"] == [4]
        assert together.json()["codes"] == alone.json()["codes"]


def test_prompts_sent_to_class_model_and_classes_to_text_model_are_422(checkpoints):
    service = make_service(checkpoints, kind="t2i")
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json={"classes": [1]})
        assert r.status_code == 422 and "text-conditional" in r.json()["error"]


# ------------------------------------------------------------------------- precomputed caption features
def npy_b64(array) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture
def feature_client(checkpoints):
    """A t2i server started without a text encoder (`--text-encoder none`): features only."""
    service = make_service(checkpoints, kind="t2i", max_wait_ms=1, max_images_per_request=4)
    service.encode_prompts = None
    with TestClient(create_app(service)) as c:
        yield c


def test_feature_only_server_refuses_prompts_and_says_what_it_takes(feature_client):
    health = feature_client.get("/health").json()
    assert health["accepts"] == ["features"] and health["caption_len"] == 8 and health["caption_dim"] == 32
    r = feature_client.post("/v1/generate", json={"prompts": ["a cat"]})
    assert r.status_code == 422
    assert "--text-encoder none" in r.json()["error"] and "`features`" in r.json()["error"]


def test_features_as_lists_and_as_npy_give_the_reference_images(feature_client, checkpoints):
    rng = np.random.default_rng(0)
    real = [rng.standard_normal((3, 32)).astype(np.float32), rng.standard_normal((8, 32)).astype(np.float32)]
    padded = np.zeros((2, 8, 32), np.float32)
    mask = np.zeros((2, 8), np.float32)
    for i, r in enumerate(real):
        padded[i, 8 - len(r):], mask[i, 8 - len(r):] = r, 1
    garbage = padded.copy()
    garbage[0, :5] = 100.0  # padded slots are ignored
    greedy = {"top_k": 1, "cfg_scale": 3.0}
    forms = [{"features": [r.tolist() for r in real]},  # unpadded lists, left-padded by the server
             {"features": padded.tolist(), "mask": mask.astype(int).tolist()},
             {"features": npy_b64(padded), "mask": npy_b64(mask.astype(bool))},
             {"features": npy_b64(garbage), "mask": mask.tolist()},
             {"features": npy_b64(padded[1:]), "n": 2}]  # (1, 8, 32) without mask: all 8 tokens are real
    answers = [feature_client.post("/v1/generate", json={**form, **greedy}) for form in forms]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    gpt = load_gpt(checkpoints / "t2i")
    expected = reference_generate(gpt, torch.from_numpy(padded), torch.from_numpy(mask), **greedy).tolist()
    for answer in answers[:3]:
        assert answer.json()["codes"] == expected
    assert answers[3].json()["codes"] == expected  # whatever sits in the padded slots
    assert answers[4].json()["codes"] == [expected[1], expected[1]]
    assert answers[0].json()["params"]["features"] == {"captions": 2, "tokens": [3, 8], "mask": False}
    assert answers[1].json()["params"]["features"] == {"captions": 2, "tokens": [3, 8], "mask": True}
    half = padded.astype(np.float16)  # float16 .npy is read as float32
    r = feature_client.post("/v1/generate", json={"features": npy_b64(half), "mask": npy_b64(mask), **greedy})
    cond = torch.from_numpy(half.astype(np.float32))
    assert r.json()["codes"] == reference_generate(gpt, cond, torch.from_numpy(mask), **greedy).tolist()


def _bad_npy_header() -> str:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 8, 32), }"
    header += b" " * (117 - len(header)) + b"\n"
    return base64.b64encode(b"\x93NUMPY\x01\x00" + bytes([len(header), 0]) + header + b"\0" * 8).decode()


ONE = [[0.5] * 32]  # one caption token
MASK = [[0] * 7 + [1]]


@pytest.mark.parametrize("payload, status, fragment", [
    ({"features": [[[0.5] * 31]]}, 422, "32-wide"),
    ({"features": npy_b64(np.zeros((1, 2, 2048), np.float32))}, 422, "2048 wide"),
    ({"features": [ONE * 9]}, 422, "1 to 8"),
    ({"features": [[]]}, 422, "empty"),
    ({"features": []}, 422, "empty"),
    ({"features": [[[0.5] * 32, [0.5] * 3]]}, 422, "different lengths"),
    ({"features": [[["x"] * 32]]}, 422, "features[0][0][0]"),
    ({"features": [ONE * 8], "mask": [[0] * 7 + [2]]}, 422, "0 (padding) or 1"),
    ({"features": [ONE * 8], "mask": [[1] + [0] * 7]}, 422, "left padded"),
    ({"features": [ONE * 8], "mask": [[0] * 8]}, 422, "left padded"),
    ({"features": [ONE * 8], "mask": [[0] * 6 + [1]]}, 422, "(1 captions, 8 tokens)"),
    ({"features": [ONE * 8], "mask": MASK + MASK}, 422, "(1 captions, 8 tokens)"),
    ({"features": [ONE], "mask": MASK}, 422, "exactly 8"),
    ({"features": "not base64!"}, 422, "not base64"),
    ({"features": base64.b64encode(b"hello").decode()}, 422, "not a readable .npy"),
    ({"features": _bad_npy_header()}, 422, "header says (100000, 8, 32)"),
    ({"features": npy_b64(np.zeros((1, 2, 32), np.int32))}, 422, "dtype int32"),
    ({"features": npy_b64(np.zeros((2, 32), np.float32))}, 422, "(captions, tokens, 32)"),
    ({"features": npy_b64(np.full((1, 2, 32), np.inf, np.float32))}, 422, "finite"),
    ({"features": npy_b64(np.full((1, 2, 32), 1e39))}, 422, "finite"),
    ({"features": [ONE * 8], "mask": npy_b64(np.full((1, 8), 0.5))}, 422, "0 (padding) or 1"),
    ({"features": [ONE] * 5}, 413, "at most 4"),
    ({"features": [ONE], "n": 5}, 413, "at most 4"),
    ({"features": [ONE], "prompts": ["a"]}, 422, "exactly one"),
    ({"classes": [1]}, 422, "text-conditional"),
])
def test_invalid_caption_features_are_refused_with_a_message(feature_client, payload, status, fragment):
    r = feature_client.post("/v1/generate", json=payload)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_oversized_feature_payload_is_413(checkpoints):
    service = make_service(checkpoints, kind="t2i", max_body_bytes=1 << 12)
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/generate", json={"features": npy_b64(np.zeros((4, 8, 32), np.float32))})
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]


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
    with pytest.raises(SystemExit) as refused:  # argparse refuses it: exit 2, usage and one error line
        main(["serve", "--tokenizer", str(checkpoints / "vq"), "--gpt", str(checkpoints / "c2i"), "--port", "0"])
    assert refused.value.code == 2 and "--port" in capsys.readouterr().err


def test_cli_serve_t2i_with_text_encoder_none_takes_features(checkpoints, monkeypatch, capsys):
    import uvicorn

    from argen.cli.main import main

    served = {}

    def fake_run(app, host, port, log_level):
        with TestClient(app) as c:
            served["health"] = c.get("/health").json()
            served["prompt"] = c.post("/v1/generate", json={"prompts": ["a cat"]})
            served["features"] = c.post("/v1/generate", json={"features": [[[0.1] * 32] * 3], "seed": 1})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    rc = main(["serve", "--tokenizer", str(checkpoints / "vq"), "--gpt", str(checkpoints / "t2i"), "--device", "cpu",
               "--text-encoder", "none", "--max-body-mb", "1"])
    assert rc == 0 and "caption features only" in capsys.readouterr().out
    assert served["health"]["accepts"] == ["features"] and served["health"]["max_body_bytes"] == 1 << 20
    assert served["prompt"].status_code == 422 and "--text-encoder none" in served["prompt"].json()["error"]
    assert served["features"].status_code == 200 and len(served["features"].json()["codes"][0]) == 16


def test_cli_serve_refuses_a_text_encoder_of_the_wrong_width_at_startup(checkpoints, tmp_path, monkeypatch, capsys):
    """A FLAN-T5-XL-like folder (2048 wide) for a 32-wide generator fails before weights load or serving."""
    import uvicorn

    import argen.data.text_encoders as text_encoders
    from argen.cli.main import main

    folder = tmp_path / "flan-t5-xl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 2048}))

    def never(*args, **kwargs):
        raise AssertionError("must not get this far")

    monkeypatch.setattr(uvicorn, "run", never)
    monkeypatch.setattr(text_encoders, "load_text_encoder", never)
    rc = main(["serve", "--tokenizer", str(checkpoints / "vq"), "--gpt", str(checkpoints / "t2i"), "--device", "cpu",
               "--text-encoder", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "2048-wide" in err and "32-wide" in err and "--text-encoder none" in err


def test_prompt_encoder_checks_the_loaded_width_too(checkpoints, monkeypatch):
    import argen.data.text_encoders as text_encoders
    from argen.serving.text import prompt_encoder
    from argen.utils.errors import ArgenError

    class Encoder:
        dim = 384

    monkeypatch.setattr(text_encoders, "load_text_encoder", lambda *a, **k: Encoder())
    with pytest.raises(ArgenError, match="384-wide .* 32-wide"):
        prompt_encoder(load_gpt(checkpoints / "t2i"), "minilm", "cpu")


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


# ------------------------------------------------------------------------- a real server process
def test_real_argen_serve_process_on_loopback(checkpoints):
    """`argen serve` under uvicorn on 127.0.0.1: JSON and PNG answers, 422, metrics, and Ctrl-C (SIGINT)
    answering a request still queued, then exiting 0. About 5 s, mostly the process start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "argen.cli.main", "serve", "--tokenizer", str(checkpoints / "vq"),
           "--gpt", str(checkpoints / "c2i"), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", "4", "--max-wait-ms", "1000", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            r = http.post("/v1/generate", json={"classes": [1, 2], "n": 2, "seed": 3, "top_k": 1})
            assert r.status_code == 200 and set(r.json()) == {"images", "codes", "params", "timings"}
            assert len(r.json()["codes"]) == 4 and r.json()["codes"][0] == r.json()["codes"][1]
            png = http.post("/v1/generate", json={"classes": [4]}, headers={"accept": "image/png"})
            assert png.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(png.content)).size == (64, 64)
            assert http.post("/v1/generate", json={"classes": [1], "top_p": 0}).status_code == 422
            assert http.get("/metrics").json()["completed_total"] == 2
            answer = {}
            waiting = threading.Thread(target=lambda: answer.update(r=httpx.post(f"{url}/v1/generate", timeout=60,
                                                                                 json={"classes": [3]})))
            waiting.start()
            while http.get("/metrics").json()["queue_depth"] == 0 and waiting.is_alive():
                time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # the queued request (up to 1 s of batching wait) still gets its images
        waiting.join(60)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------- schedulers
def test_serve_config_scheduler_is_checked_and_continuous_by_default():
    from argen.utils.errors import ArgenError

    assert ServeConfig().scheduler == "continuous"
    with pytest.raises(ArgenError, match="--scheduler"):
        ServeConfig(scheduler="fifo")


@pytest.mark.repro
def test_continuous_requests_that_join_later_get_the_images_they_get_alone(checkpoints):
    """Two slots, five requests submitted while others run: each request's codes equal the static
    scheduler's, `argen.generate` with the image_seed rule (what `argen sample` runs), and for
    greedy requests the reference sampler's."""
    from argen.engine import generate
    from argen.sampling import image_seed

    specs = [JobSpec([1, 2], SamplingParams(top_k=1, cfg_scale=3.0), seed=1),
             JobSpec([3], SamplingParams(top_k=20, temperature=1.2, cfg_scale=2.0, cfg_interval=4), seed=2),
             JobSpec([4], SamplingParams(top_k=1, cfg_scale=4.0, cfg_schedule="linear"), seed=3),
             JobSpec([5, 6], SamplingParams(top_p=0.8), seed=4),
             JobSpec([7], SamplingParams(top_k=1), seed=5)]
    results = {}
    for scheduler in ("continuous", "static"):
        service = make_service(checkpoints, max_batch_size=2, max_wait_ms=1, scheduler=scheduler)
        service.start()
        try:
            jobs = []
            for spec in specs:
                jobs.append(service.submit(spec))
                time.sleep(0.005)  # arrivals spread over the first steps
            results[scheduler] = [job.future.result(timeout=120) for job in jobs]
            metrics = service.metrics()
        finally:
            service.close()
        assert metrics["scheduler"] == scheduler
    gpt = load_gpt(checkpoints / "c2i")
    for spec, cont, static in zip(specs, results["continuous"], results["static"]):
        assert cont["codes"] == static["codes"], spec
        gens = [torch.Generator().manual_seed(image_seed(spec.seed, i)) for i in range(len(spec.conditions))]
        alone = generate(gpt, torch.tensor(spec.conditions), params=spec.params, row_generators=gens)
        assert cont["codes"] == alone.tolist(), spec
        if spec.params.top_k == 1:
            p = spec.params
            greedy = reference_generate(gpt, torch.tensor(spec.conditions), cfg_scale=p.cfg_scale,
                                        cfg_schedule=p.cfg_schedule, top_k=1)
            assert cont["codes"] == greedy.tolist(), spec
        assert cont["timings"]["queue_ms"] >= 0 and cont["timings"]["generate_ms"] > 0


def test_continuous_t2i_prompts_and_features_with_different_lengths_match_static(checkpoints):
    specs = [JobSpec(["a red bird on a branch"], SamplingParams(top_k=1, cfg_scale=2.0), seed=1),
             JobSpec(["x", "a much longer prompt about a boat at sea"], SamplingParams(top_k=30), seed=2)]
    results = {}
    for scheduler in ("continuous", "static"):
        service = make_service(checkpoints, kind="t2i", max_batch_size=2, max_wait_ms=1, scheduler=scheduler)
        service.start()
        try:
            jobs = [service.submit(spec) for spec in specs]
            results[scheduler] = [job.future.result(timeout=120)["codes"] for job in jobs]
        finally:
            service.close()
    assert results["continuous"] == results["static"]


def test_continuous_cancel_frees_the_slots_and_metrics_report_them(checkpoints):
    service = make_service(checkpoints, max_batch_size=2, max_wait_ms=1)
    decoder = service.decoder
    original = decoder.step
    admitted, go = threading.Event(), threading.Event()

    def gated():  # hold the first step after the first admission until the test says go
        if not go.is_set():
            admitted.set()
            assert go.wait(30)
        return original()

    decoder.step = gated
    service.start()
    try:
        job = service.submit(JobSpec([1, 2], SamplingParams(top_k=5), seed=0))
        assert admitted.wait(30)
        metrics = service.metrics()
        assert metrics["slots"] == 2 and metrics["slots_active"] == 2 and metrics["in_flight_images"] == 2
        service.cancel(job)
        later = service.submit(JobSpec([3], SamplingParams(top_k=1), seed=1))
        go.set()
        assert len(later.future.result(timeout=60)["codes"]) == 1
        assert job.future.cancelled()
        for _ in range(500):  # the worker may still be retiring the last slot
            metrics = service.metrics()
            if metrics["slots_active"] == 0:
                break
            time.sleep(0.01)
    finally:
        service.close()
    assert metrics["slots_active"] == 0 and metrics["in_flight_images"] == 0 and decoder.free == 2
    assert metrics["cancelled_total"] == 1 and metrics["completed_total"] == 1
    assert metrics["prefills_total"] == 3 and metrics["decode_steps_total"] >= 15
    assert 0 < metrics["slot_occupancy"] <= 1 and metrics["prefills_per_s"] > 0 and metrics["decode_steps_per_s"] > 0
