"""Many LoRA adapters in one model, one batch (issue 26 part 3): batched LoRA (`argen.nn.lora`), a per-row adapter
index on the slots of the one decode loop, `argen serve --lora NAME=DIR` with BASE:NAME models.

The promise checked everywhere: the greedy tokens of a request with adapter X equal those of the merged model X
run alone, whatever shares its step, and base requests give the plain base's tokens. Adapters are stand-ins
(random A and B, `benchmarks/standin_adapters.make_adapter`); `y` rebuilds the class rows (3 new classes)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from standin_adapters import make_adapter

import argen
from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.engine import Batches, JacobiStep, PlainStep, SlotDecoder, SlotRequest
from argen.models.tokenizer import VQModel, vq_config
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.serving import GenerationService, ServeConfig, create_app
from argen.utils.errors import ArgenError
from conftest import tiny_gpt
from test_engine import simulated_cuda_graphs  # noqa: F401 (fixture)
from test_lora import _serve
from test_openai import live_server
from test_web import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401 (fixture)

GREEDY = SamplingParams(cfg_scale=2.0, top_k=1)
# (class id, adapter index or None): x = 0, y = 1 (its own 3 classes), the base
MIX = [(1, 0), (2, 1), (3, None), (0, 1), (5, 0), (2, None), (1, 1)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilora")
    base = tiny_gpt("c2i", seed=0)
    argen.save_gpt(base, root / "base")
    make_adapter(base, root / "base", root / "x", seed=1)
    make_adapter(base, root / "base", root / "y", seed=2, rank=8, targets="attn,output",
                 class_names=["corgi", "logo", "sunset"])
    save_tokenizer(VQModel(vq_config("VQ-tiny-16")).eval(), root / "vq")
    return root


def load_multi(root, **kwargs):
    return argen.load_gpt(root / "base", adapters=[f"x={root / 'x'}", f"y={root / 'y'}"], **kwargs)


@pytest.fixture(scope="module")
def models(adapters):
    """The multi-adapter model, and each model run alone: merged x, merged y, the plain base."""
    root = adapters
    return load_multi(root), {0: argen.load_gpt(root / "base", lora=str(root / "x")),
                              1: argen.load_gpt(root / "base", lora=str(root / "y")),
                              None: argen.load_gpt(root / "base")}


def alone(alone_models, cls: int, adapter, step=None) -> torch.Tensor:
    return SlotDecoder(alone_models[adapter], 1, step).run([SlotRequest(torch.tensor(cls), params=GREEDY)])[0]


def test_both_forms_of_the_layer_give_each_row_its_own_adapter():
    """Few rows: A and B gathered per row; many: all rows through the stacked A and B, masked per row."""
    from argen.nn.lora import AdapterRows, BatchedLoraLinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    a, b = torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 5, generator=g)
    a[0], b[0] = 0, 0  # the base's entry
    rows = AdapterRows(3, 2)
    layer = BatchedLoraLinear(base, a, b, rows)
    for index in ([2], [1, 0, 2, 2, 1]):  # 1 row < 2 adapters: gathered; 5 rows: stacked
        index = torch.tensor(index)
        x = torch.randn(len(index), 1, 6, generator=g)
        rows.set(index)
        with torch.no_grad():
            got = layer(x)
            want = torch.stack([base(x[i]) + x[i] @ a[k].T @ b[k] for i, k in enumerate(index.tolist())])
            assert torch.allclose(got, want, atol=1e-6)
            assert torch.equal(got[index == 0], base(x[index == 0]))  # base rows: the plain layer's numbers
    rows.set(None)
    assert torch.equal(layer(x), base(x))


def test_the_adapters_change_the_tokens(models):
    """The check can fail: merged x, merged y and the base give different greedy tokens."""
    _, single = models
    tokens = [alone(single, 1, a) for a in (0, 1, None)]
    assert not torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[1], tokens[2])


@pytest.mark.parametrize("step", [PlainStep, lambda: JacobiStep(4), lambda: JacobiStep(4, "3x2")],
                         ids=["plain", "jacobi", "jacobi-tree"])
def test_slot_decoder_mixes_adapters_in_one_step(models, step):
    """Requests join at different steps (continuous admission) with x, y and the base in the same slots."""
    multi, single = models
    decoder = SlotDecoder(multi, 4, step())
    requests = [SlotRequest(torch.tensor(c), params=GREEDY, adapter=a, tag=i) for i, (c, a) in enumerate(MIX)]
    out = dict(zip(range(len(MIX)), decoder.run(requests)))
    for i, (c, a) in enumerate(MIX):
        assert torch.equal(out[i], alone(single, c, a, step())), (i, c, a)


def test_edits_with_kept_runs_share_an_extend_across_adapters(models):
    """Forced tokens (an edit): adjacent slots of different adapters feed their kept runs in one forward."""
    multi, single = models
    cfg = multi.config
    forced = torch.full((cfg.num_image_tokens,), -1)
    forced[3:9] = torch.arange(6) * 7  # a kept run, then sampled tokens
    mix = [(1, 0), (2, 1), (3, None)]
    decoder = SlotDecoder(multi, 3)
    got = decoder.run([SlotRequest(torch.tensor(c), params=GREEDY, adapter=a, forced=forced) for c, a in mix])
    assert decoder.counters["extends"] == 1  # the three slots' kept run in one forward pass
    for (c, a), tokens in zip(mix, got):
        want = SlotDecoder(single[a], 1).run([SlotRequest(torch.tensor(c), params=GREEDY, forced=forced)])[0]
        assert torch.equal(tokens, want), a
        assert torch.equal(tokens[3:9], forced[3:9])


def test_batches_take_mixed_adapters_and_leave_the_base_alone(models):
    multi, single = models
    cond = torch.tensor([c for c, _ in MIX])
    gens = [torch.Generator().manual_seed(i) for i in range(len(MIX))]
    tokens = Batches(multi).generate(cond, params=GREEDY, row_generators=gens, adapters=[a for _, a in MIX])
    for i, (c, a) in enumerate(MIX):
        assert torch.equal(tokens[i], alone(single, c, a)), (i, c, a)
    # sampled (not greedy) base rows: the same tokens as the plain base for the same seeds, bit for bit
    params = SamplingParams(cfg_scale=3.0, top_k=50)
    seeds = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    mixed = Batches(multi).generate(torch.tensor([3, 1]), params=params, adapters=[None, 0], row_generators=seeds)
    plain = Batches(single[None]).generate(torch.tensor([3]), params=params,
                                           row_generators=[torch.Generator().manual_seed(7)])
    assert torch.equal(mixed[0], plain[0])


def test_the_captured_step_reads_the_adapter_index_in_place(models, simulated_cuda_graphs):  # noqa: F811
    """The fixed-shape step captured once (CUDA graph semantics, simulated on the CPU) serves any mix later."""
    multi, single = models
    engine = simulated_cuda_graphs(multi, kv_bucket=16)
    for mix in (MIX[:4], list(reversed(MIX[:4]))):
        cond = torch.tensor([c for c, _ in mix])
        tokens = engine.generate(cond, params=GREEDY, adapters=[a for _, a in mix])
        for i, (c, a) in enumerate(mix):
            assert torch.equal(tokens[i], alone(single, c, a)), (i, c, a)


@pytest.mark.gpu
def test_cuda_graphs_serve_mixed_adapters(adapters):
    multi = load_multi(adapters, device="cuda")
    single = {0: argen.load_gpt(adapters / "base", lora=str(adapters / "x"), device="cuda"),
              1: argen.load_gpt(adapters / "base", lora=str(adapters / "y"), device="cuda"),
              None: argen.load_gpt(adapters / "base", device="cuda")}
    decoder = SlotDecoder(multi, 4)
    assert decoder.use_graphs
    requests = [SlotRequest(torch.tensor(c), params=GREEDY, adapter=a) for c, a in MIX]
    for (c, a), tokens in zip(MIX, decoder.run(requests)):
        assert torch.equal(tokens, alone(single, c, a))
    assert decoder.graphs


def test_text_adapters_with_their_own_caption_projection(tmp_path):
    """t2i: an adapter with a new caption projection (and unconditional caption) beside a plain one and the base;
    masked (left-padded) captions of different lengths."""
    base = tiny_gpt("t2i", seed=0)
    argen.save_gpt(base, tmp_path / "base")
    make_adapter(base, tmp_path / "base", tmp_path / "p", seed=1, caption_proj=True)
    make_adapter(base, tmp_path / "base", tmp_path / "q", seed=2, targets="ffn")
    multi = argen.load_gpt(tmp_path / "base", adapters=[f"p={tmp_path / 'p'}", f"q={tmp_path / 'q'}"])
    single = {0: argen.load_gpt(tmp_path / "base", lora=str(tmp_path / "p")),
              1: argen.load_gpt(tmp_path / "base", lora=str(tmp_path / "q")), None: argen.load_gpt(tmp_path / "base")}
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    requests = []
    for i, adapter in enumerate([0, 1, None, 0, None]):
        mask = torch.zeros(cfg.caption_len)
        mask[-(2 + i):] = 1
        requests.append(SlotRequest(torch.randn(cfg.caption_len, cfg.caption_dim, generator=g) * mask[:, None], mask,
                                    params=GREEDY, adapter=adapter))
    got = SlotDecoder(multi, 3).run(requests)
    for r, tokens in zip(requests, got):
        want = SlotDecoder(single[r.adapter], 1).run([SlotRequest(r.cond, r.cond_mask, params=GREEDY)])[0]
        assert torch.equal(tokens, want), r.adapter
    plain = SlotDecoder(single[None], 1).run([SlotRequest(requests[0].cond, requests[0].cond_mask, params=GREEDY)])[0]
    assert not torch.equal(got[0], plain)


def test_unknown_adapters_and_classes_are_refused(models):
    multi, single = models
    with pytest.raises(ArgenError, match=r"adapter 2 is not served.*0..1 \(x, y\)"):
        SlotDecoder(multi, 2).admit([SlotRequest(torch.tensor(0), adapter=2)])
    with pytest.raises(ArgenError, match="class ids of y must lie in \\[0, 2\\]"):
        SlotDecoder(multi, 2).admit([SlotRequest(torch.tensor(5), adapter=1)])
    with pytest.raises(ArgenError, match="it has none"):
        SlotDecoder(single[None], 2).admit([SlotRequest(torch.tensor(0), adapter=0)])


# ------------------------------------------------------------------ the server
def _service(root, gpt, scheduler):
    tokenizer = argen.load_tokenizer(root / "vq")
    return GenerationService(tokenizer, gpt, ServeConfig(scheduler=scheduler, max_batch_size=4, max_wait_ms=50))


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_server_mixes_adapters_and_matches_each_model_alone(adapters, models, scheduler):
    multi, single = models
    greedy = {"cfg_scale": 2.0, "top_k": 1, "seed": 5}
    service = _service(adapters, multi, scheduler)
    with TestClient(create_app(service, model_id="base")) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["base", "base:x", "base:y"]
        assert listed[2]["argen"]["class_names"] == ["corgi", "logo", "sunset"]
        assert listed[2]["argen"]["num_classes"] == 3 and listed[1]["argen"]["num_classes"] == 10
        assert client.get("/v1/models/base:y").json()["argen"]["adapter"] == "y"
        service.pause()  # every request queued first: they share the batch (static) or the steps (continuous)
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, "/v1/generate", json={"classes": [2], **greedy, **extra})
                       for extra in ({"adapter": "x"}, {"adapter": "y"}, {})]
            futures.append(pool.submit(client.post, "/v1/images/generations", json={
                "prompt": "sunset", "model": "base:y", "response_format": "b64_json", **greedy}))
            import time

            time.sleep(0.5)
            service.resume()
            answers = [f.result() for f in futures]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        codes = [a.json()["codes"][0] for a in answers[:3]]
        assert answers[0].json()["params"]["adapter"] == "x"
        assert answers[3].json()["data"][0]["revised_prompt"] == "sunset (class 2)"
        # unknown adapters: 404 naming what is served
        wrong = client.post("/v1/generate", json={"classes": [1], "adapter": "z"})
        assert wrong.status_code == 404 and "'x', 'y'" in wrong.json()["error"]
        wrong = client.post("/v1/images/generations", json={"prompt": "1", "model": "base:z"})
        assert wrong.status_code == 404 and "'base', 'base:x', 'base:y'" in wrong.json()["error"]["message"]
        assert client.get("/v1/models/base:z").status_code == 404
        assert client.post("/v1/generate", json={"classes": [5], "adapter": "y"}).status_code == 422
    for got, adapter in zip(codes, (0, 1, None)):
        seeded = torch.Generator().manual_seed(image_seed(5, 0))
        want = SlotDecoder(single[adapter], 1).run([SlotRequest(torch.tensor(2), params=GREEDY, generator=seeded)])
        assert got == want[0].tolist(), adapter


# ------------------------------------------------------------------ the CLI
def test_serve_loads_named_adapters_once(adapters, monkeypatch, capsys):
    root = adapters
    answers = _serve(monkeypatch, ["--gpt", str(root / "base"), "--tokenizer", str(root / "vq"), "--lora",
                                   f"dogs={root / 'x'}", "--lora", f"{root / 'y'}:0.5"],
                     lambda client: {"models": client.get("/v1/models").json(),
                                     "health": client.get("/health").json()})
    assert [m["id"] for m in answers["models"]["data"]] == ["base", "base:dogs", "base:y"]
    assert answers["health"]["adapters"] == ["dogs", "y"]
    assert "LoRA adapters base:dogs, base:y" in capsys.readouterr().out


def test_bad_adapters_are_one_line_and_exit_2(adapters, tmp_path, capsys):
    root = adapters

    def refused(extra, *expected):
        code = main(["serve", "--gpt", str(root / "base"), "--tokenizer", str(root / "vq"), "--device", "cpu",
                     "--port", "8142", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        for text in expected:
            assert text in err, err

    refused(["--lora", f"a={tmp_path / 'nowhere'}"], "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((root / "x" / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes((root / "x" / "adapter_model.safetensors").read_bytes()[:80])
    refused(["--lora", str(broken)], "truncated or corrupt")
    other = tiny_gpt("c2i", seed=3)
    argen.save_gpt(other, tmp_path / "other")
    make_adapter(other, tmp_path / "other", tmp_path / "foreign", seed=4)
    refused(["--lora", str(tmp_path / "foreign")], "was trained on", "not on")
    refused(["--lora", f"a={root / 'x'}", "--lora", f"a={root / 'y'}"], "two adapters are named a")
    # an adapter that does not fit: made for a wider model that claims this base's weights
    wide = tiny_gpt("c2i", seed=0, dim=128)
    make_adapter(wide, root / "base", tmp_path / "wide", seed=5, identity=argen.load_gpt(root / "base"))
    refused(["--lora", str(tmp_path / "wide")], "does not fit", "dim 128 vs 64")


def test_an_adapter_from_the_hub(adapters, tmp_path, monkeypatch):
    """--lora hf://owner/name: the adapter's two files through huggingface_hub, from a stand-in Hub."""
    from test_hub import FakeHub, point_at

    root = adapters
    files = {("me/dogs", name): (root / "x" / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    server = FakeHub(files)
    try:
        point_at(server, tmp_path / "cache", monkeypatch)
        multi = argen.load_gpt(root / "base", adapters=["hf://me/dogs"])
        assert multi.multi_lora.names == ["dogs"]
        merged = argen.load_gpt(root / "base", lora="hf://me/dogs:1")
    finally:
        server.close()
    local = argen.load_gpt(root / "base", lora=str(root / "x"))
    assert torch.equal(merged.output.weight, local.output.weight)
    decoder = SlotDecoder(multi, 2)
    tokens = decoder.run([SlotRequest(torch.tensor(1), params=GREEDY, adapter=0)])[0]
    assert torch.equal(tokens, SlotDecoder(local, 1).run([SlotRequest(torch.tensor(1), params=GREEDY)])[0])


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
def test_the_web_page_picks_a_model_from_its_menu(adapters, models, browser):  # noqa: F811
    from selenium.webdriver.support.ui import Select, WebDriverWait

    multi, _ = models
    wait = WebDriverWait(browser, 60)
    with live_server(create_app(_service(adapters, multi, "continuous"), model_id="base")) as url:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element("id", "generate").is_enabled())
        menu = Select(browser.find_element("id", "model-menu"))
        assert [o.text for o in menu.options] == ["base", "base:x", "base:y"]
        assert browser.find_element("id", "model-label").is_displayed()
        menu.select_by_visible_text("base:y")
        options = browser.execute_script(
            "return [...document.querySelectorAll('#class-names option')].map(o => o.value)")
        assert options == ["corgi", "logo", "sunset"]  # y's own classes
        assert len(browser.find_elements("id", "condition")) == 1
        for field, value in (("condition", "sunset"), ("n", 1)):
            element = browser.find_element("id", field)
            element.clear()
            element.send_keys(str(value))
        browser.find_element("id", "generate").click()
        wait.until(lambda d: d.find_elements("css selector", "figure.done img.result"))
        assert "sunset (class 2)" in browser.find_element("css selector", "figure.done figcaption").text
