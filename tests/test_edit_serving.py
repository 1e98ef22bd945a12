"""Editing through `argen serve`: OpenAI's `images.edit` (the official client, multipart) and argen's
`POST /v1/edit`, on both schedulers; the same limits as generation (413, 422, 503)."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from argen.checkpoint import load_gpt, load_tokenizer
from argen.editing import edit, encode_images
from argen.engine import decode_codes
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.serving.service import JobSpec
from forced_standin import engine_has_forced_tokens
from test_openai import checkpoints, live_server, make_app, png  # noqa: F401  (checkpoints: a fixture)

needs_engine = pytest.mark.skipif(not engine_has_forced_tokens(), reason="the engine has no forced tokens yet")
SETTINGS = {"seed": 5, "top_k": 20, "cfg_scale": 2.0}


def picture() -> np.ndarray:
    g = np.random.default_rng(0)
    return g.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bottom_mask(size: int = 64, alpha: bool = True) -> bytes:
    if alpha:
        mask = np.full((size, size, 4), 255, np.uint8)
        mask[size // 2:, :, 3] = 0  # transparent = edited
    else:
        mask = np.zeros((size, size), np.uint8)
        mask[size // 2:] = 255  # white = edited
    return png_bytes(mask)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture
def client(checkpoints):  # noqa: F811
    with TestClient(make_app(checkpoints, max_images_per_request=4)) as c:
        yield c


@needs_engine
def test_official_openai_client_edits_and_argen_api_agrees(checkpoints):  # noqa: F811
    openai = pytest.importorskip("openai")
    image = picture()
    with live_server(make_app(checkpoints)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.images.edit(image=("in.png", png_bytes(image), "image/png"),
                                    mask=("mask.png", bottom_mask(), "image/png"), prompt="Flags", n=2,
                                    size="64x64", response_format="b64_json", model="gpt-c2i", extra_body=SETTINGS)
        assert len(answer.data) == 2 and answer.data[0].revised_prompt == "Flags (class 3)"
        edited = [png(item.b64_json) for item in answer.data]
        assert all(e.shape == (64, 64, 3) for e in edited) and not np.array_equal(edited[0], edited[1])
        own = httpx.post(f"{url}/v1/edit", json={"image": b64(png_bytes(image)), "mask": b64(bottom_mask(alpha=False)),
                                                 "classes": [3], "n": 2, **SETTINGS}, timeout=60).json()
        assert [png(i).tolist() for i in own["images"]] == [e.tolist() for e in edited]  # the same request
        assert own["mask"] == [[0] * 4] * 2 + [[1] * 4] * 2 and own["regenerated_tokens"] == 8
        with pytest.raises(openai.UnprocessableEntityError, match="the mask is 32x32 but the image is 64x64"):
            client.images.edit(image=("in.png", png_bytes(image), "image/png"),
                               mask=("mask.png", bottom_mask(32), "image/png"), prompt="3")
        with pytest.raises(openai.BadRequestError, match="unknown class"):
            client.images.edit(image=("in.png", png_bytes(image), "image/png"), prompt="Flag")

    tokenizer, gpt = load_tokenizer(checkpoints / "vq"), load_gpt(checkpoints / "gpt-c2i")
    codes = encode_images(tokenizer, image[None]).flatten(1)
    got = torch.tensor(own["codes"])
    assert torch.equal(got[:, :8], codes[:, :8].expand(2, -1))  # the kept (top) tokens
    mask = np.zeros((64, 64), bool)
    mask[32:] = True
    params = SamplingParams.for_model(gpt, cfg_scale=2.0, top_k=20)
    library = edit(gpt, tokenizer, image, mask, torch.tensor([3, 3]), params=params,
                   row_generators=[torch.Generator().manual_seed(image_seed(5, i)) for i in range(2)])
    assert torch.equal(library.codes, got)  # the server's edit is the library's


@needs_engine
def test_an_edit_does_not_depend_on_what_shares_the_slots(checkpoints):  # noqa: F811
    app = make_app(checkpoints, max_batch_size=4)
    service = app.state.service
    body = {"image": b64(png_bytes(picture())), "box": [0, 16, 48, 64], "classes": [2], "n": 2, **SETTINGS}
    with TestClient(app) as c:
        alone = c.post("/v1/edit", json=body).json()["codes"]

        async def together():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as ac:
                service.pause()
                tasks = [asyncio.create_task(ac.post("/v1/generate", json={"classes": [1, 4], "seed": 1})),
                         asyncio.create_task(ac.post("/v1/edit", json=body))]
                await asyncio.sleep(0.3)
                service.resume()
                return [(await t).json() for t in tasks]

        shared = asyncio.run(together())
    assert shared[1]["codes"] == alone


@needs_engine
def test_a_mask_that_keeps_everything_returns_the_round_trip_and_says_so(client, checkpoints):  # noqa: F811
    image = picture()
    keep = np.full((64, 64, 4), 255, np.uint8)
    answer = client.post("/v1/edit", json={"image": b64(png_bytes(image)), "mask": b64(png_bytes(keep)),
                                           "classes": [1]}).json()
    assert answer["kept_everything"] and "round trip" in answer["note"] and answer["regenerated_tokens"] == 0
    tokenizer = load_tokenizer(checkpoints / "vq")
    trip = decode_codes(tokenizer, encode_images(tokenizer, image[None]))
    assert np.array_equal(png(answer["images"][0]), trip[0])


@pytest.mark.parametrize("change, message", [
    ({"mask": b64(bottom_mask(32))}, "the mask is 32x32 but the image is 64x64"),
    ({"image": b64(b"not an image")}, "cannot read the image"),
    ({"mask": b64(b"junk")}, "cannot read the mask"),
    ({"mask": None, "box": [0, 0, 65, 10]}, "not a non-empty box inside the 64x64 image"),
    ({"mask": None}, "send a mask"),
    ({"image": "%%%"}, "not valid base64"),
])
def test_bad_images_and_masks_are_422(client, change, message):
    body = {"image": b64(png_bytes(picture())), "mask": b64(bottom_mask()), "classes": [1], **change}
    if body["mask"] is None:
        del body["mask"]
    r = client.post("/v1/edit", json=body)
    assert r.status_code == 422 and message in r.json()["error"]


def test_openai_form_errors_use_the_openai_shape(client):
    files = {"image": ("in.png", png_bytes(picture()), "image/png"), "mask": ("m.png", bottom_mask(16), "image/png")}
    r = client.post("/v1/images/edits", files=files, data={"prompt": "3"})
    assert r.status_code == 422 and "the mask is 16x16" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", files={"image": files["image"]}, data={"prompt": "3", "n": "zero"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/images/edits", files={"image": files["image"]}, data={"prompt": "3", "style": "vivid"})
    assert r.status_code == 400 and "unknown field 'style'" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", files={"mask": files["mask"]}, data={"prompt": "3"})
    assert r.status_code == 400 and "`image`" in r.json()["error"]["message"]
    r = client.post("/v1/images/edits", json={"prompt": "3"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_oversized_uploads_are_413(checkpoints):  # noqa: F811
    with TestClient(make_app(checkpoints, max_body_bytes=4096)) as c:
        big = png_bytes(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8))
        r = c.post("/v1/images/edits", files={"image": ("in.png", big, "image/png")}, data={"prompt": "3"})
        assert r.status_code == 413 and "upload is over 4096 bytes" in r.json()["error"]["message"]
        r = c.post("/v1/edit", json={"image": b64(big), "box": [0, 0, 8, 8], "classes": [1]})
        assert r.status_code == 413


def test_a_full_queue_answers_503(checkpoints):  # noqa: F811
    app = make_app(checkpoints, max_batch_size=2, max_queue=2, max_images_per_request=2)
    service = app.state.service
    service.start()
    service.pause()
    try:
        held = service.submit(JobSpec([1, 2], SamplingParams(top_k=5), seed=0))
        body = {"image": b64(png_bytes(picture())), "box": [0, 0, 32, 32], "classes": [1]}

        async def overflow():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
                files = {"image": ("in.png", png_bytes(picture()), "image/png"),
                         "mask": ("m.png", bottom_mask(), "image/png")}
                return [await ac.post("/v1/edit", json=body), await ac.post("/v1/images/edits", files=files,
                                                                             data={"prompt": "1"})]

        own, openai = asyncio.run(overflow())
        assert own.status_code == 503 and "queue is full" in own.json()["error"]
        assert openai.status_code == 503 and "queue is full" in openai.json()["error"]["message"]
        service.resume()
        assert len(held.future.result(timeout=60)["codes"]) == 2
    finally:
        service.close()


def test_the_static_scheduler_edits_like_the_continuous_one(checkpoints):  # noqa: F811
    body = {"image": b64(png_bytes(picture())), "box": [0, 32, 64, 64], "classes": [1, 4], "n": 2, **SETTINGS}
    with TestClient(make_app(checkpoints)) as c:
        continuous = c.post("/v1/edit", json=body).json()["codes"]
    with TestClient(make_app(checkpoints, scheduler="static")) as c:
        r = c.post("/v1/edit", json=body)
        assert r.status_code == 200, r.text
        static = r.json()["codes"]
    assert static == continuous and len(static) == 4
    codes = torch.tensor(static)  # (4, N)
    kept = codes[:, :codes.shape[1] // 2]
    assert torch.equal(kept, kept[:1].expand(4, -1))  # the top half is the input's tokens in every image
    assert not torch.equal(codes[0], codes[2])  # classes 1 and 4 regenerate the bottom differently
