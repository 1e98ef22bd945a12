"""The OpenAI images API of `argen serve`: the official `openai` client against a real server on
loopback, and the request mapping (class ids and names, size, response_format, model, argen's own
fields through `extra_body`) in process, on tiny random models."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from argen.checkpoint import load_gpt, load_tokenizer, save_gpt, save_tokenizer
from argen.checkpoint.hub import gpt_class_names, model_id
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQModel, vq_config
from argen.sampling import reference_generate
from argen.serving import GenerationService, ServeConfig, create_app
from test_serve import fake_prompt_encoder

CLASS_NAMES = ["Activities", "Animals & Nature", "Component", "Flags", "Food & Drink", "Objects", "People & Body",
               "Smileys & Emotion", "Symbols", "Travel & Places"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny tokenizer, a c2i generator saved with class names (as argen train stores them) and a t2i one."""
    root = tmp_path_factory.mktemp("openai")
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-tiny-16")), root / "vq")
    for kind in ("c2i", "t2i"):
        gpt = GPT(gpt_config("GPT-tiny", kind=kind))
        torch.nn.init.normal_(gpt.output.weight, std=0.5)
        save_gpt(gpt, root / f"gpt-{kind}", extra={"class_names": CLASS_NAMES} if kind == "c2i" else None)
    return root


def make_app(checkpoints, kind="c2i", **config):
    tokenizer = load_tokenizer(checkpoints / "vq")
    ref = checkpoints / f"gpt-{kind}"
    gpt = load_gpt(ref)
    encode = fake_prompt_encoder(gpt) if kind == "t2i" else None
    service = GenerationService(tokenizer, gpt, ServeConfig(**{"max_wait_ms": 5, **config}), encode_prompts=encode)
    names = gpt_class_names(ref, gpt.config.num_classes) if kind == "c2i" else None
    return create_app(service, model_id=model_id(ref), class_names=names)


@contextmanager
def live_server(app):
    """The app under uvicorn on 127.0.0.1 in a thread -> its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


# ------------------------------------------------------------------------- the official client
@pytest.mark.repro
def test_official_openai_client_gets_decodable_pngs(checkpoints):
    openai = pytest.importorskip("openai")
    with live_server(make_app(checkpoints)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["gpt-c2i"]
        assert client.models.retrieve("gpt-c2i").owned_by == "argen"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("dall-e-3")
        answer = client.images.generate(prompt="Flags", n=2, size="64x64", response_format="b64_json",
                                        model="gpt-c2i", extra_body={"seed": 3, "top_k": 1, "cfg_scale": 2.0})
        assert answer.created > 0 and len(answer.data) == 2
        images = [png(item.b64_json) for item in answer.data]
        assert all(img.shape == (64, 64, 3) and img.dtype == np.uint8 for img in images)
        assert answer.data[0].revised_prompt == "Flags (class 3)"
        assert np.array_equal(images[0], images[1])  # greedy (top_k 1): both images of class 3 are the same
        by_id = client.images.generate(prompt="3", n=1, extra_body={"seed": 3, "top_k": 1, "cfg_scale": 2.0})
        assert np.array_equal(png(by_id.data[0].b64_json), images[0])
        other = client.images.generate(prompt="smileys & emotion", extra_body={"seed": 3, "top_k": 1, "cfg_scale": 2.0})
        assert other.data[0].revised_prompt == "Smileys & Emotion (class 7)"
        assert not np.array_equal(png(other.data[0].b64_json), images[0])

        with pytest.raises(openai.BadRequestError, match="this model generates 64x64 images only"):
            client.images.generate(prompt="3", size="1024x1024")
        with pytest.raises(openai.BadRequestError, match="response_format 'url' is not supported"):
            client.images.generate(prompt="3", response_format="url")
        with pytest.raises(openai.BadRequestError, match=r"unknown class 'Flag'.*close matches: 'Flags' \(3\)"):
            client.images.generate(prompt="Flag")
        with pytest.raises(openai.NotFoundError, match="serves 'gpt-c2i'"):
            client.images.generate(prompt="3", model="dall-e-3")
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.images.generate(prompt="3", extra_body={"top_p": 0})


# ------------------------------------------------------------------------- mapping, in process
@pytest.fixture
def client(checkpoints):
    with TestClient(make_app(checkpoints, max_images_per_request=4)) as c:
        yield c


def generations(client, **body):
    return client.post("/v1/images/generations", json=body)


@pytest.mark.repro
def test_images_equal_the_argen_request_they_stand_for(client, checkpoints):
    r = generations(client, prompt="Food & Drink", n=2, seed=5, top_k=1, cfg_scale=3.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"} and [set(d) for d in body["data"]] == [{"b64_json", "revised_prompt"}] * 2
    same = client.post("/v1/generate", json={"classes": [4], "n": 2, "seed": 5, "top_k": 1, "cfg_scale": 3.0}).json()
    assert [d["b64_json"] for d in body["data"]] == same["images"]
    expected = reference_generate(load_gpt(checkpoints / "gpt-c2i"), torch.tensor([4, 4]), cfg_scale=3.0, top_k=1)
    assert same["codes"] == expected.tolist()
    sampled = generations(client, prompt="4", n=2, seed=5).json()["data"]  # seeded sampling: image 0 != image 1
    assert sampled[0]["b64_json"] != sampled[1]["b64_json"]
    assert generations(client, prompt="4", n=2, seed=5).json()["data"] == sampled


def test_class_names_are_matched_loosely_and_unknown_ones_get_close_matches(client):
    for prompt in ("people & body", "  People  &  Body ", "PEOPLE_&_BODY"):
        r = generations(client, prompt=prompt, top_k=1, seed=0)
        assert r.status_code == 200 and r.json()["data"][0]["revised_prompt"] == "People & Body (class 6)"
    r = generations(client, prompt="Animal & Nature")
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and error["code"] == "unknown_class"
    assert "'Animals & Nature' (1)" in error["message"]
    r = generations(client, prompt="zebra crossing")
    assert r.status_code == 400 and "send a class id in 0..9" in r.json()["error"]["message"]
    r = generations(client, prompt="10")
    assert r.status_code == 400 and "class ids must lie in [0, 9]" in r.json()["error"]["message"]


def test_request_errors_use_the_openai_error_shape(client):
    cases = [({"prompt": "1", "size": "256x256"}, 400, "size"),
             ({"prompt": "1", "response_format": "url"}, 400, "response_format"),
             ({"prompt": "1", "model": "dall-e-2"}, 404, "model"),
             ({"prompt": "1", "n": 5}, 413, None),
             ({"prompt": "1", "n": 0}, 400, "n"),
             ({"prompt": "1", "temperature": 0}, 400, None),
             ({"prompt": "1", "style": "vivid"}, 400, "style"),
             ({"prompt": "   "}, 400, "prompt"),
             ({"n": 1}, 400, "prompt")]
    for body, status, param in cases:
        r = generations(client, **body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        assert error["param"] == param, (body, error)
    assert "at most 4" in generations(client, prompt="1", n=5).json()["error"]["message"]
    ok = [generations(client, prompt="1", size=size, response_format=fmt, model=model, user="me").status_code
          for size, fmt, model in (("64x64", "b64_json", "gpt-c2i"), ("auto", None, None))]
    assert ok == [200, 200]


def test_models_lists_the_loaded_model_with_what_the_page_needs(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    entry = body["data"][0]
    assert entry["id"] == "gpt-c2i" and entry["object"] == "model" and entry["owned_by"] == "argen"
    info = entry["argen"]
    assert info["kind"] == "c2i" and info["size"] == "64x64" and info["class_names"] == CLASS_NAMES
    assert info["defaults"]["cfg_scale"] == 4.0 and info["defaults"]["top_k"] == 2000
    assert info["max_images_per_request"] == 4 and info["num_classes"] == 10


def test_t2i_prompts_are_captions(checkpoints):
    with TestClient(make_app(checkpoints, "t2i")) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red flag", "n": 2, "seed": 1, "top_k": 1})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and "revised_prompt" not in data[0] and png(data[0]["b64_json"]).shape == (64, 64, 3)
        same = c.post("/v1/generate", json={"prompts": ["a red flag"], "n": 2, "seed": 1, "top_k": 1}).json()
        assert [d["b64_json"] for d in data] == same["images"]
        assert c.get("/v1/models").json()["data"][0]["argen"]["class_names"] is None


def test_a_model_without_class_names_takes_ids_and_says_so(checkpoints, tmp_path):
    save_gpt(load_gpt(checkpoints / "gpt-c2i"), tmp_path / "plain")
    assert gpt_class_names(tmp_path / "plain", 10) is None
    service = GenerationService(load_tokenizer(checkpoints / "vq"), load_gpt(tmp_path / "plain"),
                                ServeConfig(max_wait_ms=5))
    with TestClient(create_app(service)) as c:
        assert c.post("/v1/images/generations", json={"prompt": "2"}).status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "Flags"})
        assert r.status_code == 400 and "has no class names; send a class id in 0..9" in r.json()["error"]["message"]


def test_openapi_schema_lists_the_openai_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/images/generations" in paths and "/v1/models" in paths and "/v1/generate" in paths
    schema = paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in schema["properties"] and "cfg_scale" in schema["properties"]


def test_the_web_page_is_served_at_the_root(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for part in ('id="generate"', "/v1/images/generations", "/v1/models", 'id="error"'):
        assert part in r.text


def test_argen_train_stores_the_class_names_that_serve_shows(tmp_path):
    """The codes' class names (the demo's categories) go into the generator file, and from there to the server."""
    from argen.data.codes import CodeShardWriter
    from argen.training.generator import TrainConfig, train

    rng = np.random.default_rng(0)
    writer = CodeShardWriter(tmp_path / "codes", {"kind": "c2i", "codebook_size": 512, "grid": [4, 4],
                                                  "image_size": 64, "num_augs": 1, "num_classes": 10,
                                                  "class_names": CLASS_NAMES})
    writer.write_shard(0, rng.integers(0, 512, (16, 1, 4, 4)), rng.integers(0, 10, 16))
    writer.finalize()
    train(TrainConfig(codes=str(tmp_path / "codes"), out=str(tmp_path / "run"), config="GPT-tiny", max_steps=2,
                      batch_size=8, log_every=1, tensorboard=False, progress=False, ckpt_every=2))
    assert gpt_class_names(tmp_path / "run", 10) == CLASS_NAMES
    assert gpt_class_names(tmp_path / "run", 12) is None  # names that do not fit the model are not used
