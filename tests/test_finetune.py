"""Fine-tuning from released weights (`argen train --init-from`): released names, hub references, released
.pt files and argen generators as the init; tokenizer agreement; new classes (null row kept, --class-init,
--class-map); t2i caption width and --reinit caption-proj; the finetune recipe; bad input is one line and
exit 2 with nothing written; and the user's path end to end: class folders -> extract-codes -> train
--init-from <released-format stand-in> -> sample.

The released-format files hold random weights in the released layout (`{"model": state_dict, "args": ...}`).
GPT-B and VQ-16 are far too big for a CPU test, so inside these tests the registry entries "GPT-B" and
"VQ-16" stand for GPT-tiny (with ImageNet's 1000 classes) and VQ-tiny-16 (512 codes), as in test_hub.py;
the name logic, the layouts and the code paths are the real ones.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import argen
from argen.checkpoint.hub import gpt_class_names
from argen.checkpoint.init_weights import init_architecture, read_init
from argen.checkpoint.released import imagenet_class_names
from argen.cli.main import main
from argen.data.codes import CodeShardWriter
from argen.data.extract import weights_sha256
from argen.data.text_features import save_text_features
from argen.models.gpt import GPT, GPT_CONFIGS
from argen.models.tokenizer import VQ_CONFIGS, VQModel
from argen.training.config import TrainConfig
from argen.training.generator import train
from argen.training.recipes import load_recipe
from argen.utils.errors import ArgenError
from conftest import randomize, save_released

SMALL_C2I = replace(GPT_CONFIGS["GPT-tiny"], num_classes=1000, image_size=256, name="GPT-B")
SMALL_VQ = replace(VQ_CONFIGS["VQ-tiny-16"], name="VQ-16")
TABLE = "cls_embedding.embedding_table.weight"


@pytest.fixture
def registry(monkeypatch):
    """GPT-B / GPT-XL and VQ-16 stand for tiny models (see the module docstring)."""
    monkeypatch.setitem(GPT_CONFIGS, "GPT-B", SMALL_C2I)
    monkeypatch.setitem(GPT_CONFIGS, "GPT-XL", replace(SMALL_C2I, kind="t2i", caption_dim=2048, caption_len=120,
                                                        name="GPT-XL"))
    monkeypatch.setitem(VQ_CONFIGS, "VQ-16", SMALL_VQ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def released_pair(folder, kind="c2i", tokenizer_seed=0):
    """c2i_B_256.pt (or t2i_XL_stage1_256.pt) and its tokenizer beside it, in the released layout."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    name = "c2i_B_256" if kind == "c2i" else "t2i_XL_stage1_256"
    cfg = GPT_CONFIGS["GPT-B" if kind == "c2i" else "GPT-XL"]
    gpt = randomize(GPT(cfg), seed=1)
    torch.manual_seed(tokenizer_seed)
    vq = VQModel(SMALL_VQ).eval()
    save_released(gpt, folder / f"{name}.pt")
    save_released(vq, folder / f"vq_ds16_{kind}.pt")
    return folder / f"{name}.pt", vq, gpt


def make_codes(root, tokenizer: VQModel | None, kind="c2i", n=8, class_names=("golden retriever", "my logo"),
               caption_dim=2048, codebook=512):
    """Codes as extract-codes writes them (tokenizer config and weights hash recorded), 4x4 grid (64 px)."""
    rng = np.random.default_rng(0)
    meta = {"kind": kind, "codebook_size": codebook, "grid": [4, 4], "image_size": 64, "num_augs": 1}
    if tokenizer is not None:
        meta.update(tokenizer=tokenizer.config.to_dict(), tokenizer_sha256=weights_sha256(tokenizer))
    labels = np.arange(n) % len(class_names)
    if kind == "c2i":
        meta.update(num_classes=len(class_names), class_names=list(class_names))
    else:
        save_text_features(root / "text", [torch.randn(5, caption_dim) for _ in range(n)], encoder="test-encoder")
        meta["text_features"] = "../text"
        labels = np.arange(n)
    writer = CodeShardWriter(root / "codes", meta)
    writer.write_shard(0, rng.integers(0, codebook, (n, 1, 4, 4)), labels)
    writer.finalize()
    return root / "codes"


def run(tmp_path, codes, init, *extra, out="run", steps="1"):
    return main(["train", "--codes", str(codes), "--init-from", str(init), "--out", str(tmp_path / out),
                 "--max-steps", steps, "--batch-size", "4", "--no-progress", "--no-tensorboard", "--device", "cpu",
                 *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("argen train: error:")]
    assert len(lines) == 1 and err.endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ init references
def test_architecture_comes_from_the_init_and_a_contradicting_config_fails_before_any_download(registry, tmp_path):
    assert init_architecture("c2i_B_256").name == "GPT-B"  # from the name: nothing is read or downloaded
    with pytest.raises(ArgenError, match="--config GPT-L contradicts --init-from c2i_B_384, which is GPT-B"):
        init_architecture("c2i_B_384", "GPT-L")
    with pytest.raises(ArgenError, match="tokenizer"):
        init_architecture("vq_ds16_c2i")
    # a released-format file without a released name: the architecture is read from its tensor shapes
    torch.manual_seed(0)
    plain = save_released(randomize(GPT(replace(GPT_CONFIGS["GPT-mini"], num_classes=7))), tmp_path / "mine.pt")
    init = read_init(str(plain))
    assert (init.config.name, init.config.num_classes, init.config.vocab_size) == ("GPT-mini", 7, 1024)
    with pytest.raises(ArgenError, match="contradicts"):
        read_init(str(plain), "GPT-tiny")


def test_every_kind_of_reference_gives_the_same_weights(registry, tmp_path, monkeypatch):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    argen.save_gpt(gpt, tmp_path / "argen-run", extra={"class_names": list(imagenet_class_names())})
    for ref in (pt, tmp_path / "argen-run", tmp_path / "argen-run" / "gpt.safetensors"):
        init = read_init(str(ref))
        assert init.config.num_classes == 1000 and init.class_names[207] == "golden retriever"
        assert torch.equal(init.state["output.weight"], gpt.output.weight)
    monkeypatch.chdir(tmp_path / "rel")  # a bare released name resolves to the local file when there is one
    assert torch.equal(read_init("c2i_B_256.pt").state[TABLE], gpt.cls_embedding.embedding_table.weight)


# ------------------------------------------------------------------ new classes
def test_new_classes_keep_the_null_row_and_start_from_imagenet_by_name(registry, tmp_path, capsys):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("golden_retriever", "tabby"))
    assert run(tmp_path, codes, pt, "--lr", "1e-12", "--class-init", "imagenet") == 0
    assert "class embedding rebuilt for 2 classes" in capsys.readouterr().err
    table = load_file(str(tmp_path / "run" / "gpt.safetensors"))[TABLE]
    old = gpt.cls_embedding.embedding_table.weight
    assert table.shape == (3, old.shape[1])
    assert torch.allclose(table[0], old[207], atol=1e-6) and torch.allclose(table[1], old[281], atol=1e-6)
    assert torch.allclose(table[2], old[1000], atol=1e-6)  # the null (unconditional) row is kept, last
    model = argen.load_gpt(tmp_path / "run")
    assert model.config.num_classes == 2 and model.config.image_size == 64  # another image size than the init's
    assert gpt_class_names(tmp_path / "run", 2) == ["golden_retriever", "tabby"]
    saved = json.loads((tmp_path / "run" / "gpt.json").read_text())
    assert saved["tokenizer"]["name"] == "vq_ds16_c2i" and saved["tokenizer"]["sha256"] == weights_sha256(vq)
    assert saved["training"]["init_from"] == str(pt.resolve())


@pytest.mark.parametrize("how", ["null", "mean"])
def test_class_init_null_and_mean(registry, tmp_path, how):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("golden retriever", "my logo"))
    assert run(tmp_path, codes, pt, "--lr", "1e-12", "--class-init", how) == 0
    table = load_file(str(tmp_path / "run" / "gpt.safetensors"))[TABLE]
    old = gpt.cls_embedding.embedding_table.weight
    expected = old[1000] if how == "null" else old[:1000].mean(dim=0)
    assert torch.allclose(table[0], expected, atol=1e-6) and torch.allclose(table[1], expected, atol=1e-6)


def test_default_matches_names_and_starts_the_rest_from_the_mean(registry, tmp_path):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("Golden Retriever", "my logo"))
    assert run(tmp_path, codes, pt, "--lr", "1e-12") == 0
    table = load_file(str(tmp_path / "run" / "gpt.safetensors"))[TABLE]
    old = gpt.cls_embedding.embedding_table.weight
    assert torch.allclose(table[0], old[207], atol=1e-6)
    assert torch.allclose(table[1], old[:1000].mean(dim=0), atol=1e-6)


def test_class_map_by_id_and_by_name(registry, tmp_path):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("rex", "my logo"))
    (tmp_path / "map.json").write_text(json.dumps({"rex": "Golden Retriever", "my logo": 3}))
    assert run(tmp_path, codes, pt, "--lr", "1e-12", "--class-init", "imagenet", "--class-map",
               str(tmp_path / "map.json")) == 0
    table = load_file(str(tmp_path / "run" / "gpt.safetensors"))[TABLE]
    old = gpt.cls_embedding.embedding_table.weight
    assert torch.allclose(table[0], old[207], atol=1e-6) and torch.allclose(table[1], old[3], atol=1e-6)


def test_same_classes_keep_the_table(registry, tmp_path):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=imagenet_class_names())
    assert run(tmp_path, codes, pt, "--lr", "1e-12") == 0
    table = load_file(str(tmp_path / "run" / "gpt.safetensors"))[TABLE]
    assert torch.allclose(table, gpt.cls_embedding.embedding_table.weight, atol=1e-6)


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing lost
def test_unknown_names_list_close_matches(registry, tmp_path, capsys):
    pt, vq, _ = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq, class_names=("golden retreiver", "my logo"))
    assert run(tmp_path, codes, pt, "--class-init", "imagenet") == 2
    line = one_line_error(capsys)
    assert "'golden retreiver' (close: 'golden retriever'" in line and "'my logo'" in line
    assert "--class-init mean or null" in line and "--class-map" in line
    assert not (tmp_path / "run").exists()
    (tmp_path / "map.json").write_text(json.dumps({"golden retreiver": "golden retriver"}))
    assert run(tmp_path, codes, pt, "--class-map", str(tmp_path / "map.json")) == 2
    line = one_line_error(capsys)
    assert "'golden retriver' (close: 'golden retriever'" in line and "mean or null" in line
    (tmp_path / "map.json").write_text(json.dumps({"poodle": 1}))
    assert run(tmp_path, codes, pt, "--class-map", str(tmp_path / "map.json")) == 2
    assert "classes the codes do not have: 'poodle'" in one_line_error(capsys)
    (tmp_path / "map.json").write_text("{not json")
    assert run(tmp_path, codes, pt, "--class-map", str(tmp_path / "map.json")) == 2
    assert "not valid JSON" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_codes_from_another_tokenizer_are_refused(registry, tmp_path, capsys):
    pt, vq, _ = released_pair(tmp_path / "rel")
    torch.manual_seed(5)
    other = VQModel(SMALL_VQ).eval()  # the same config and vocabulary, other weights
    codes = make_codes(tmp_path, other)
    assert run(tmp_path, codes, pt) == 2
    line = one_line_error(capsys)
    assert "vq_ds16_c2i" in line and weights_sha256(other)[:12] in line and weights_sha256(vq)[:12] in line
    assert "--allow-tokenizer-change" in line
    assert not (tmp_path / "run").exists()
    assert run(tmp_path, codes, pt, "--allow-tokenizer-change") == 0
    assert "was not checked" in capsys.readouterr().err


def test_vocabulary_mismatch_names_both_sizes_and_tokenizers(registry, tmp_path, capsys):
    pt, _, _ = released_pair(tmp_path / "rel")
    tokenizer = VQModel(replace(VQ_CONFIGS["VQ-tiny-16"], codebook_size=256, name="VQ-tiny-256")).eval()
    codes = make_codes(tmp_path, tokenizer, codebook=256)
    assert run(tmp_path, codes, pt, "--allow-tokenizer-change") == 2  # not even with the flag
    line = one_line_error(capsys)
    assert "VQ-tiny-256" in line and "256 codes" in line and "predicts 512 tokens" in line
    assert "vq_ds16_c2i" in line


def test_contradicting_config_and_stray_flags(registry, tmp_path, capsys):
    pt, vq, _ = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq)
    assert run(tmp_path, codes, pt, "--config", "GPT-mini") == 2
    assert "--config GPT-mini contradicts" in one_line_error(capsys)
    assert main(["train", "--codes", str(codes), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--class-init", "mean"]) == 2
    assert "add --init-from" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_nothing_already_written_is_lost(registry, tmp_path, capsys):
    pt, vq, _ = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq)
    assert run(tmp_path, codes, pt, "--lr", "1e-12") == 0
    before = (tmp_path / "run" / "gpt.safetensors").read_bytes()
    torch.manual_seed(5)
    bad = make_codes(tmp_path / "other", VQModel(SMALL_VQ).eval())
    assert run(tmp_path, bad, pt, "--resume") == 2
    one_line_error(capsys)
    assert (tmp_path / "run" / "gpt.safetensors").read_bytes() == before


# ------------------------------------------------------------------ t2i
def test_t2i_caption_width_and_reinit_caption_proj(registry, tmp_path, capsys):
    pt, vq, gpt = released_pair(tmp_path / "rel", kind="t2i")
    narrow = make_codes(tmp_path / "narrow", vq, kind="t2i", caption_dim=384)
    assert run(tmp_path, narrow, pt) == 2
    line = one_line_error(capsys)
    assert "384 wide" in line and "takes 2048" in line and "--reinit caption-proj" in line
    assert run(tmp_path, narrow, pt, "--reinit", "caption-proj", "--lr", "1e-12") == 0
    assert "the text path of t2i_XL_stage1_256 starts over" in capsys.readouterr().err
    model = argen.load_gpt(tmp_path / "run")
    assert (model.config.caption_dim, model.config.caption_len) == (384, 5)
    weights = load_file(str(tmp_path / "run" / "gpt.safetensors"))
    assert torch.allclose(weights["layers.0.attention.wqkv.weight"], gpt.layers[0].attention.wqkv.weight, atol=1e-6)

    wide = make_codes(tmp_path / "wide", vq, kind="t2i", caption_dim=2048)
    assert run(tmp_path, wide, pt, "--lr", "1e-12", out="run-t5") == 0
    model = argen.load_gpt(tmp_path / "run-t5")
    assert model.config.caption_len == 120  # the init's unconditional caption is kept
    assert torch.allclose(model.cls_embedding.cap_proj.fc1.weight, gpt.cls_embedding.cap_proj.fc1.weight, atol=1e-6)
    assert torch.equal(model.cls_embedding.uncond_embedding, gpt.cls_embedding.uncond_embedding)
    assert run(tmp_path, wide, pt, "--reinit", "caption-proj", "--class-init", "mean", out="x") == 2
    assert "class-conditional" in one_line_error(capsys)


# ------------------------------------------------------------------ recipe and dry run
def test_init_from_defaults_to_the_finetune_recipe(registry, tmp_path, capsys):
    recipe = load_recipe("finetune", "train")
    assert recipe["settings"]["lr"] < load_recipe("c2i_B_256", "train")["settings"]["lr"]
    assert recipe["sources"]["lr"].startswith("argen's own choice")
    assert main(["train", "--init-from", "c2i_B_256", "--dry-run"]) == 0  # no download: the name says it all
    out = capsys.readouterr().out
    assert "recipe finetune" in out and re.search(r"^  lr +2e-05  <- argen's own choice", out, re.M)
    assert "generator: GPT-B" in out and "--init-from c2i_B_256" in out
    assert main(["train", "--init-from", "c2i_B_256", "--lr", "3e-4", "--dry-run"]) == 0
    assert re.search(r"^  lr +0.0003  <- command line", capsys.readouterr().out, re.M)


def test_python_api_takes_a_released_name(registry, tmp_path, monkeypatch):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, vq)
    monkeypatch.chdir(tmp_path / "rel")
    result = train(TrainConfig(codes=str(codes), out=str(tmp_path / "api"), init_from="c2i_B_256.pt", max_steps=1,
                               batch_size=4, lr=1e-12, progress=False, tensorboard=False, device="cpu"))
    assert result["config"] == "GPT-B" and result["steps"] == 1


# ------------------------------------------------------------------ the user's path
def test_class_folders_to_extract_codes_to_finetune_to_sample(registry, tmp_path):
    pt, vq, gpt = released_pair(tmp_path / "rel")
    rng = np.random.default_rng(0)
    for name in ("golden retriever", "my logo"):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tokenizer = tmp_path / "rel" / "vq_ds16_c2i.pt"
    assert main(["extract-codes", "--tokenizer", str(tokenizer), "--data", str(tmp_path / "images"), "--split", "all",
                 "--image-size", "64", "--flip", "--out", str(tmp_path / "codes"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert main(["train", "--codes", str(tmp_path / "codes"), "--init-from", str(pt), "--out", str(tmp_path / "ft"),
                 "--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard", "--device", "cpu",
                 "--class-init", "imagenet", "--class-map", str(_map(tmp_path))]) == 0
    assert gpt_class_names(tmp_path / "ft", 2) == ["golden retriever", "my logo"]
    train_config = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    assert train_config["train"]["lr"] == load_recipe("finetune")["settings"]["lr"]
    assert main(["sample", "--gpt", str(tmp_path / "ft"), "--tokenizer", str(tokenizer), "--classes", "0,1",
                 "--top-k", "10", "--device", "cpu", "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    images = sorted(p.name for p in (tmp_path / "samples").glob("*.png") if p.name.startswith("0000"))
    assert images[:2] == ["00000_class0.png", "00001_class1.png"]
    assert np.array(Image.open(tmp_path / "samples" / images[0])).shape == (64, 64, 3)


def _map(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"my logo": "sturgeon"}))
    return path


# ------------------------------------------------------------------ the Hub: released names and hf:// references
@pytest.fixture
def hub(registry, tmp_path, monkeypatch):
    """A loopback Hub (test_hub.FakeHub) serving c2i_B_256.pt and vq_ds16_c2i.pt; an empty cache."""
    from huggingface_hub import constants

    from test_hub import FakeHub, released_bytes

    torch.manual_seed(0)
    gpt = randomize(GPT(SMALL_C2I), seed=1)
    vq = VQModel(SMALL_VQ).eval()
    server = FakeHub({("FoundationVision/LlamaGen", "c2i_B_256.pt"): released_bytes(gpt),
                      ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt"): released_bytes(vq)})
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr("time.sleep", lambda s: None)
    # the stand-in Hub cuts every first transfer; huggingface_hub's resume warnings would go to a stderr
    # stream that pytest has already closed for an earlier test ("--- Logging error ---")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its child loggers inherit it
    yield server, gpt, vq
    hub_logger.setLevel(level)
    server.close()


def test_released_name_and_hub_reference_from_the_hub(hub, tmp_path, capsys):
    server, gpt, vq = hub
    codes = make_codes(tmp_path, vq)
    assert run(tmp_path, codes, "c2i_B_256", "--lr", "1e-12") == 0  # the tokenizer it implies is fetched to check
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in server.requests
               if method == "GET" and path.endswith(".pt")}
    assert fetched == {"c2i_B_256.pt", "vq_ds16_c2i.pt"}
    saved = json.loads((tmp_path / "run" / "gpt.json").read_text())
    assert saved["training"]["init_from"] == "hf://FoundationVision/LlamaGen/c2i_B_256.pt"
    assert saved["tokenizer"]["name"] == "vq_ds16_c2i"
    out = load_file(str(tmp_path / "run" / "gpt.safetensors"))
    assert torch.allclose(out["layers.1.feed_forward.w2.weight"], gpt.layers[1].feed_forward.w2.weight, atol=1e-6)

    torch.manual_seed(5)
    other = make_codes(tmp_path / "other", VQModel(SMALL_VQ).eval())
    assert run(tmp_path, other, "hf://FoundationVision/LlamaGen/c2i_B_256.pt", out="x") == 2
    assert "trained on vq_ds16_c2i" in one_line_error(capsys)
    assert run(tmp_path, codes, "c2i_B_384", "--config", "GPT-L", out="y") == 2  # refused before any download
    assert "contradicts" in one_line_error(capsys)
    assert not [path for _, path, _ in server.requests if "c2i_B_384" in path]


def test_codes_that_record_no_tokenizer_train_with_a_note(registry, tmp_path, capsys):
    pt, _, _ = released_pair(tmp_path / "rel")
    codes = make_codes(tmp_path, None)  # written by an older argen, or by hand
    assert run(tmp_path, codes, pt, "--lr", "1e-12") == 0
    assert "could not check that the codes come from c2i_B_256's tokenizer" in capsys.readouterr().err


def test_plan_classes_without_weights(registry):
    from argen.training.finetune import plan_classes

    init = read_init("c2i_B_256", weights=False)  # no download: the name says the architecture
    assert init.state is None and init.class_names == list(imagenet_class_names())
    wnids = [f"n{10000000 + i:08d}" for i in range(1000)]  # ImageNet's synset folders, in sorted order
    assert plan_classes(init, wnids, 1000, None, None, "codes")[0] is None
    assert plan_classes(init, None, 1000, None, None, "codes")[0] is None  # no names, same count
    starts, notes = plan_classes(init, ["Crane", "tabby", "x"], 3, None, None, "codes")
    assert starts == [imagenet_class_names().index("crane"), 281, "mean"] and "'x' <- mean" in notes[0]
    assert plan_classes(init, None, 5, "null", None, "codes")[0] == ["null"] * 5
    with pytest.raises(ArgenError, match="record no class names"):
        plan_classes(init, None, 5, "imagenet", None, "codes")
