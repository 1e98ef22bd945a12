"""LoRA adapters (issue 26 part 2): `argen train --lora-rank` trains peft adapters on a released-format base and
saves them in peft's layout with argen's record; `load_gpt(lora=)`, `--lora` and `argen merge-lora` merge them;
merged and unmerged logits agree and greedy tokens are equal; peft itself reads the files; bad input is one line
and exit 2 with nothing written lost. The stand-in released files are those of test_finetune (tiny models in the
released layout, named c2i_B_256.pt / vq_ds16_c2i.pt)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import argen
from argen.checkpoint.adapters import apply_adapters, read_adapter
from argen.cli.main import main
from argen.engine import generate
from argen.models.gpt import GPT, GPT_CONFIGS
from argen.utils.errors import ArgenError
from conftest import randomize, save_released
from test_finetune import hub, make_codes, registry, released_pair  # noqa: F401 (fixtures)

FLAGS = ["--batch-size", "4", "--no-progress", "--no-tensorboard", "--device", "cpu", "--lr", "0.5",
         "--warmup", "0", "--dropout", "0"]


def train_lora(tmp_path, codes, init, out="lora", *extra, steps="2"):
    return main(["train", "--codes", str(codes), "--init-from", str(init), "--out", str(tmp_path / out),
                 "--max-steps", steps, "--lora-rank", "4", *FLAGS, *extra])


@pytest.fixture
def trained(registry, tmp_path, capsys):  # noqa: F811
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("golden retriever", "my logo"))
    assert train_lora(tmp_path, codes, pt) == 0
    captured = capsys.readouterr()
    assert "adapter in" in captured.out
    return pt, vq, gpt, codes, tmp_path / "lora", captured.err


def _tokens(n=2, length=16, seed=0):
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def test_adapter_in_peft_layout_with_argen_record(trained):
    pt, vq, gpt, codes, lora, err = trained
    assert "LoRA rank 4 on w1, w2, w3, wo, wqkv" in err
    assert not (lora / "gpt.safetensors").exists()
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert sorted(config["target_modules"]) == ["w1", "w2", "w3", "wo", "wqkv"]
    assert config["modules_to_save"] == ["cls_embedding"]  # the rebuilt class rows travel with the adapter
    state = load_file(str(lora / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") for k in state)
    assert state["base_model.model.cls_embedding.embedding_table.weight"].shape == (3, 64)
    b = state["base_model.model.layers.0.attention.wqkv.lora_B.weight"]
    assert b.shape == (192, 4) and b.abs().sum() > 0  # it trained (B starts at zero)
    adapter = read_adapter(lora)
    assert (adapter.info["base"], adapter.info["base_sha256"]) == ("c2i_B_256", None)
    assert config["base_model_name_or_path"] == "c2i_B_256"
    assert adapter.info["class_names"] == ["golden retriever",
                                                                                          "my logo"]
    assert adapter.info["tokenizer"]["sha256"]
    # only the adapter trained: 5 linears x 2 layers of rank 4, plus the 3-row class table
    n_lora = sum(v.numel() for k, v in state.items() if ".lora_" in k)
    assert n_lora == 2 * 4 * ((64 + 192) + (64 + 64) + 3 * (64 + 192))

    # peft reads the files itself
    from peft import PeftModel

    base = GPT(adapter.gpt_config)
    peft_model = PeftModel.from_pretrained(base, str(lora))
    assert torch.equal(peft_model.base_model.model.layers[0].attention.wqkv.lora_B["default"].weight, b)


def test_merged_and_unmerged_agree(trained):
    pt, vq, gpt, codes, lora, _ = trained
    merged = argen.load_gpt(str(pt), lora=str(lora))
    base = argen.load_gpt(str(pt))
    unmerged = apply_adapters(base, str(pt), [(read_adapter(lora), 1.0)], merge=False)
    assert merged.config.num_classes == 2 and merged.class_names == ["golden retriever", "my logo"]
    assert merged.config.image_size == 64  # the adapter's data shape (its codes were 64 px)
    cond = torch.tensor([0, 1])
    with torch.no_grad():
        a, b = merged.logits(_tokens(), cond), unmerged.logits(_tokens(), cond)
        plain = GPT(merged.config)
        plain.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("cls_embedding")}
                              | {k: v for k, v in merged.state_dict().items() if k.startswith("cls_embedding")})
        c = plain.eval().logits(_tokens(), cond)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter changes the model
    greedy = dict(cfg_scale=2.0, top_k=1)
    t1 = generate(merged, cond, generator=torch.Generator().manual_seed(1), **greedy)
    t2 = generate(unmerged, cond, generator=torch.Generator().manual_seed(1), **greedy)
    assert torch.equal(t1, t2)
    # a scale of 0 is the base with the adapter's class rows
    zero = argen.load_gpt(str(pt), lora=f"{lora}:0")
    with torch.no_grad():
        assert torch.allclose(zero.logits(_tokens(), cond), c, atol=1e-5)


def test_merge_lora_writes_a_plain_generator(trained, tmp_path):
    pt, vq, gpt, codes, lora, _ = trained
    assert main(["merge-lora", "--gpt", str(pt), "--lora", str(lora), "--out", str(tmp_path / "merged")]) == 0
    plain = argen.load_gpt(str(tmp_path / "merged"))
    merged = argen.load_gpt(str(pt), lora=str(lora))
    cond = torch.tensor([1, 0])
    with torch.no_grad():
        assert torch.equal(plain.logits(_tokens(), cond), merged.logits(_tokens(), cond))
    saved = json.loads((tmp_path / "merged" / "gpt.json").read_text())
    assert saved["class_names"] == ["golden retriever", "my logo"] and saved["tokenizer"]["sha256"]
    # sample --lora and sample --gpt MERGED give the same images
    tok = tmp_path / "rel" / "vq_ds16_c2i.pt"
    common = ["--tokenizer", str(tok), "--classes", "0,1", "--top-k", "1", "--device", "cpu", "--no-progress"]
    assert main(["sample", "--gpt", str(pt), "--lora", str(lora), "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["sample", "--gpt", str(tmp_path / "merged"), "--out", str(tmp_path / "s2"), *common]) == 0
    for image in sorted((tmp_path / "s1").glob("*.png")):
        assert image.read_bytes() == (tmp_path / "s2" / image.name).read_bytes()


def test_bad_adapters_are_one_line_and_lose_nothing(trained, tmp_path, capsys, monkeypatch):
    pt, vq, gpt, codes, lora, _ = trained
    capsys.readouterr()

    def refused(argv, *expected):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors (numeric flags)
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for text in expected:
            assert text in err, err
        return err

    # an existing generator in --out is not touched by a refused merge
    (tmp_path / "keep").mkdir()
    argen.save_gpt(gpt, tmp_path / "keep")
    before = (tmp_path / "keep" / "gpt.safetensors").read_bytes()
    merge = ["merge-lora", "--gpt", str(pt), "--out", str(tmp_path / "keep"), "--overwrite"]
    refused([*merge, "--lora", str(tmp_path / "nowhere")], "does not exist")
    # wrong base: an argen copy of the same weights is another base (identity by name for released files)
    other = tmp_path / "other"
    argen.save_gpt(randomize(GPT(GPT_CONFIGS["GPT-B"]), seed=7), other)
    refused(["merge-lora", "--gpt", str(other), "--lora", str(lora), "--out", str(tmp_path / "keep"), "--overwrite"],
            "was trained on c2i_B_256", str(other))
    # a base with the adapter's name that it does not fit (here GPT-B stands for a wider model)
    (tmp_path / "wrong").mkdir()
    wider = replace(GPT_CONFIGS["GPT-mini"], num_classes=1000, image_size=256, downsample=16, name="GPT-B")
    monkeypatch.setitem(GPT_CONFIGS, "GPT-B", wider)
    save_released(randomize(GPT(wider)), tmp_path / "wrong" / "c2i_B_256.pt")
    refused(["merge-lora", "--gpt", str(tmp_path / "wrong" / "c2i_B_256.pt"), "--lora", str(lora), "--out",
             str(tmp_path / "keep"), "--overwrite"], "does not fit", "dim 64 vs 128")
    monkeypatch.setitem(GPT_CONFIGS, "GPT-B", gpt.config)
    # corrupt and half-written adapters
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((lora / "adapter_config.json").read_bytes())
    (broken / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes()[:100])
    refused([*merge, "--lora", str(broken)], "truncated or corrupt")
    (broken / "adapter_model.safetensors").unlink()
    refused([*merge, "--lora", str(broken)], "no adapter_model.safetensors")
    assert (tmp_path / "keep" / "gpt.safetensors").read_bytes() == before
    # sample --lora with a wrong base
    refused(["sample", "--gpt", str(other), "--tokenizer", str(tmp_path / "rel" / "vq_ds16_c2i.pt"), "--lora",
             str(lora), "--classes", "0", "--device", "cpu", "--out", str(tmp_path / "s")], "was trained on")
    # training flags: rank <= 0, unknown targets, LoRA without --init-from; an earlier run is untouched
    weights = (lora / "adapter_model.safetensors").read_bytes()
    refused(["train", "--codes", str(codes), "--init-from", str(pt), "--out", str(lora), "--max-steps", "1",
             "--lora-rank", "0"], "--lora-rank")
    refused(["train", "--codes", str(codes), "--init-from", str(pt), "--out", str(lora), "--max-steps", "1",
             "--lora-rank", "4", "--lora-targets", "attn,q_proj"], "q_proj", "wqkv", "ffn")
    refused(["train", "--codes", str(codes), "--config", "GPT-tiny", "--out", str(lora), "--max-steps", "1",
             "--lora-rank", "4"], "add --init-from")
    refused(["train", "--codes", str(codes), "--init-from", str(pt), "--out", str(lora), "--max-steps", "1",
             "--lora-alpha", "8"], "add --lora-rank")
    assert (lora / "adapter_model.safetensors").read_bytes() == weights
    with pytest.raises(ArgenError, match="each bring their own class rows"):
        argen.load_gpt(str(pt), lora=[str(lora), str(lora)])


def test_dry_run_shows_adapter_and_full_finetuning(registry, tmp_path, capsys):  # noqa: F811
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq)
    assert main(["train", "--codes", str(codes), "--init-from", str(pt), "--lora-rank", "4", "--dry-run",
                 "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4" in out and "trainable parameters" in out
    assert "full fine-tuning" in out and out.count("estimated GPU memory") >= 2


# ------------------------------------------------------------------ the user's path (docs/finetune.md)
def _serve(monkeypatch, argv, requests):
    """Run `argen serve ...` with uvicorn replaced by a test client making `requests(client)`."""
    import uvicorn
    from fastapi.testclient import TestClient

    answers = {}

    def fake_run(app, host, port, log_level):
        with TestClient(app) as client:
            answers.update(requests(client))

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", *argv, "--device", "cpu", "--port", "8139"]) == 0
    return answers


def test_class_folders_to_lora_to_sample_and_serve(hub, tmp_path, monkeypatch):  # noqa: F811
    """images/<class>/ -> extract-codes with the released tokenizer (by name, from a stand-in Hub) -> train
    --init-from c2i_B_256 --lora-rank 16 -> sample --lora -> serve --lora, as docs/finetune.md writes them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("golden retriever", "my cat"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8))
            image.save(tmp_path / "pets" / name / f"{i}.png")
    run = ["--device", "cpu", "--no-progress"]
    assert main(["extract-codes", "--tokenizer", "vq_ds16_c2i", "--data", str(tmp_path / "pets"), "--split", "all",
                 "--image-size", "64", "--flip", "--out", str(tmp_path / "pets-codes"), *run]) == 0
    assert main(["train", "--init-from", "c2i_B_256", "--codes", str(tmp_path / "pets-codes"), "--out",
                 str(tmp_path / "pets-lora"), "--lora-rank", "16", "--max-steps", "3", "--batch-size", "4",
                 "--no-tensorboard", *run]) == 0
    assert (tmp_path / "pets-lora" / "adapter_model.safetensors").is_file()
    assert main(["sample", "--gpt", "c2i_B_256", "--lora", str(tmp_path / "pets-lora"), "--classes", "0,1",
                 "--out", str(tmp_path / "samples"), *run]) == 0
    assert np.array(Image.open(tmp_path / "samples" / "00001_class1.png")).shape == (64, 64, 3)

    def requests(client):
        return {"models": client.get("/v1/models").json(),
                "image": client.post("/v1/images/generations", json={"prompt": "my cat", "n": 1,
                                                                    "model": "c2i_B_256:pets-lora",
                                                                    "response_format": "b64_json"})}

    answers = _serve(monkeypatch, ["--gpt", "c2i_B_256", "--lora", str(tmp_path / "pets-lora")], requests)
    base, model = answers["models"]["data"]  # the base and the adapter, served side by side
    assert base["id"] == "c2i_B_256" and model["argen"]["adapter"] == "pets-lora"
    assert model["id"] == "c2i_B_256:pets-lora" and model["argen"]["class_names"] == ["golden retriever", "my cat"]
    assert answers["image"].status_code == 200, answers["image"].text


def test_captions_to_lora_with_a_new_caption_projection(registry, tmp_path, monkeypatch):  # noqa: F811
    """The t2i path with another encoder (MiniLM): --reinit caption-proj --lora-rank: the new projection and the
    unconditional caption train and travel with the adapter; sample --prompts takes it."""
    import numpy as np
    from PIL import Image

    released_pair(tmp_path / "rel", kind="t2i")
    monkeypatch.chdir(tmp_path / "rel")  # a released file name resolves to the local file when there is one
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(["a red bicycle", "a bowl of ramen", "a lighthouse at dusk", "a green frog"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": str(tmp_path / f"{i}.png"), "caption": caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    run = ["--device", "cpu", "--no-progress"]
    assert main(["extract-text-features", "--data", str(tmp_path / "captions.jsonl"), "--encoder", "minilm",
                 "--out", str(tmp_path / "text"), *run]) == 0
    assert main(["extract-codes", "--tokenizer", "vq_ds16_t2i.pt", "--data", str(tmp_path / "captions.jsonl"),
                 "--split", "all", "--text-features", str(tmp_path / "text"), "--image-size", "64",
                 "--out", str(tmp_path / "codes"), *run]) == 0
    assert main(["train", "--init-from", "t2i_XL_stage1_256.pt", "--codes", str(tmp_path / "codes"), "--reinit",
                 "caption-proj", "--lora-rank", "8", "--out", str(tmp_path / "t2i-lora"), "--max-steps", "2",
                 "--batch-size", "4", "--no-tensorboard", *run]) == 0
    adapter = read_adapter(tmp_path / "t2i-lora")
    assert adapter.state["cls_embedding.cap_proj.fc1.weight"].shape == (64, 384)
    assert adapter.state["cls_embedding.uncond_embedding"].shape[1] == 384
    gpt = argen.load_gpt("t2i_XL_stage1_256.pt", lora=str(tmp_path / "t2i-lora"))
    assert gpt.config.caption_dim == 384 and gpt.class_names is None
    assert main(["sample", "--gpt", "t2i_XL_stage1_256.pt", "--lora", str(tmp_path / "t2i-lora"), "--prompts",
                 "a red bicycle", "--text-encoder", "minilm", "--out", str(tmp_path / "samples"), *run]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) >= 1


def test_sample_batch_with_lora_matches_the_merged_generator_and_records_it(trained, tmp_path):
    pt, vq, gpt, codes, lora, _ = trained
    assert main(["merge-lora", "--gpt", str(pt), "--lora", f"{lora}:0.5", "--out", str(tmp_path / "merged")]) == 0
    common = ["--tokenizer", str(tmp_path / "rel" / "vq_ds16_c2i.pt"), "--device", "cpu", "--num-samples", "4",
              "--num-classes", "2", "--batch-size", "2", "--no-progress"]
    assert main(["sample-batch", "--gpt", str(pt), "--lora", f"{lora}:0.5", "--out", str(tmp_path / "a"),
                 *common]) == 0
    assert main(["sample-batch", "--gpt", str(tmp_path / "merged"), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("a", "b"))
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["checkpoints"]["lora"] == [[str(lora.resolve()), 0.5]]


def test_an_adapter_on_an_argen_base_is_bound_to_its_weights(trained, tmp_path):
    pt, vq, gpt, codes, lora, _ = trained
    argen.save_gpt(gpt, tmp_path / "base")  # the released stand-in's weights, as an argen generator
    assert train_lora(tmp_path, codes, tmp_path / "base", "on-argen", steps="1") == 0
    adapter = read_adapter(tmp_path / "on-argen")
    assert adapter.info["base"] == str((tmp_path / "base").resolve()) and len(adapter.info["base_sha256"]) == 64
    moved = tmp_path / "elsewhere"
    (tmp_path / "base").rename(moved)  # the weights, not the path, identify the base
    assert argen.load_gpt(str(moved), lora=str(tmp_path / "on-argen")).config.num_classes == 2
    with torch.no_grad():
        gpt.output.weight[0, 0] += 1  # one weight differs
    argen.save_gpt(gpt, tmp_path / "changed")
    with pytest.raises(ArgenError, match=r"weights sha256 [0-9a-f]{12}\), not on .*changed \(weights sha256"):
        argen.load_gpt(str(tmp_path / "changed"), lora=str(tmp_path / "on-argen"))
