"""`argen push` and `hf://owner/name`: a trained run is staged, uploaded through huggingface_hub's HfApi to the
loopback stand-in Hub of test_hub (which stores what the commit carries and serves it back), then loaded by
name with its tokenizer, online and from the cache with HF_HUB_OFFLINE=1; bad input is one line and exit 2
with nothing sent to the Hub.

The upload runs through HfApi's real requests (create_repo, create_branch, preupload, the NDJSON commit);
the stand-in answers "regular" to preupload, so the files travel base64-encoded in the commit instead of
through Git LFS / Xet as large files do on the real Hub. What is checked there is the commit's file set,
bytes, message, branch and token, and the create_repo payload (name, organization, visibility).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import argen
from argen.checkpoint.hub import default_tokenizer, model_id
from argen.cli.main import main
from argen.training.generator import train
from argen.training.publish import find_model, stage
from argen.utils.errors import ArgenError
from conftest import tiny_tokenizer
from test_hub import FakeHub, point_at, run_offline
from test_train import make_codes, quick

TOKEN = "hf_stand_in_token"
PUSHED = {"README.md", "argen.json", "gpt.safetensors", "gpt.json", "tokenizer.safetensors", "tokenizer.json",
          "samples.png"}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """An empty loopback Hub, huggingface_hub pointed at it and at an empty cache, and a token in HF_TOKEN."""
    from huggingface_hub import constants

    server = FakeHub({})
    cache = point_at(server, tmp_path / "hf" / "hub", monkeypatch)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("time.sleep", lambda s: None)  # huggingface_hub waits before it resumes a broken transfer
    yield server, cache
    server.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished c2i run of GPT-tiny with its tokenizer (so it has sample grids) and an evaluation result."""
    root = tmp_path_factory.mktemp("push")
    codes = make_codes(root)
    argen.save_tokenizer(tiny_tokenizer(), root / "tok")
    out = root / "run"
    train(quick(codes, out, tokenizer=str(root / "tok"), sample_every=2))
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text(json.dumps({"fid": 123.25, "inception_score": 1.5, "num_samples": 8,
                                                            "inception_weights": {"random": True}}))
    return out


def one_line_error(capsys, command: str = "push") -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"argen {command}: error:")
    return err


def test_push_then_load_by_name_online_and_offline(stand_in, run_dir, tmp_path, capsys):
    server, cache = stand_in
    assert main(["push", str(run_dir), "--repo", "me/tiny-c2i", "--license", "mit"]) == 0
    assert "pushed to me/tiny-c2i" in capsys.readouterr().out
    assert server.created == [{"name": "tiny-c2i", "organization": "me", "visibility": "public", "type": "model"}]
    [(repo, revision, message, files, token)] = server.commits  # one commit: all files or none
    assert (repo, revision, message, token) == ("me/tiny-c2i", "main", "argen push", TOKEN)
    assert set(files) == PUSHED
    assert files["gpt.safetensors"] == (run_dir / "gpt.safetensors").read_bytes()
    manifest = json.loads(files["argen.json"])
    assert manifest["generator"] == "gpt.safetensors" and manifest["tokenizer"] == "tokenizer.safetensors"
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "library_name: argen" in card and "license: mit" in card
    for text in ("GPT-tiny", "| steps | 4 |", "| images | 24 |", "training loss, last logged", "123.2",
                 "random-weight Inception", 'argen.load_gpt("hf://me/tiny-c2i")', "![samples](samples.png)"):
        assert text in card, text
    assert str(run_dir.parent) not in card  # no local paths in the card
    assert files["samples.png"] == sorted((run_dir / "samples").iterdir())[-1].read_bytes()

    gpt = argen.load_gpt("hf://me/tiny-c2i")  # weights, config and tokenizer from the name alone
    expected = load_file(str(run_dir / "gpt.safetensors"))
    assert all(torch.equal(gpt.state_dict()[k], v) for k, v in expected.items())
    tokenizer = argen.load_tokenizer("hf://me/tiny-c2i")
    assert all(torch.equal(tokenizer.state_dict()[k], v) for k, v in tiny_tokenizer().state_dict().items())
    assert default_tokenizer("hf://me/tiny-c2i") == "hf://me/tiny-c2i/tokenizer.safetensors"
    assert model_id("hf://me/tiny-c2i") == "tiny-c2i"
    gets = [path for method, path, _ in server.requests if method == "GET"]
    assert any(path.endswith("/gpt.safetensors") for path in gets)

    out = tmp_path / "online"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the offline process runs (OMP_NUM_THREADS=1): float sums may differ by thread count
    try:
        assert main(["sample", "--gpt", "hf://me/tiny-c2i", "--classes", "0,3", "--device", "cpu", "--out", str(out),
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    online = np.array(Image.open(out / "00001_class3.png"))
    server.close()  # the Hub is gone: the cache and HF_HUB_OFFLINE=1 are enough
    offline = run_offline(["sample", "--gpt", "hf://me/tiny-c2i", "--classes", "0,3", "--device", "cpu",
                           "--out", str(tmp_path / "offline"), "--no-progress"], cache.parent)
    assert offline.returncode == 0, offline.stderr
    assert np.array_equal(np.array(Image.open(tmp_path / "offline" / "00001_class3.png")), online)


def test_private_push_to_a_branch(stand_in, run_dir, capsys):
    server, _ = stand_in
    assert main(["push", str(run_dir), "--repo", "me/branchy", "--private", "--revision", "v1",
                 "--message", "first cut"]) == 0
    assert server.created[0]["visibility"] == "private"
    [(repo, revision, message, files, _)] = server.commits
    assert (repo, revision, message) == ("me/branchy", "v1", "first cut") and set(files) == PUSHED
    assert argen.load_gpt("hf://me/branchy@v1").config.name == "GPT-tiny"
    assert argen.load_tokenizer("hf://me/branchy@v1").config.codebook_size == 512
    with pytest.raises(ArgenError, match="has no argen.json"):  # main has nothing: the branch alone got the commit
        argen.load_gpt("hf://me/branchy")


def test_bad_input_is_one_line_and_nothing_reaches_the_hub(stand_in, run_dir, tmp_path, monkeypatch, capsys):
    server, _ = stand_in
    (tmp_path / "empty").mkdir()
    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "a-tokenizer")
    cases = [
        ([str(tmp_path / "empty"), "--repo", "me/x"], "is not an argen run"),
        ([str(tmp_path / "a-tokenizer"), "--repo", "me/x"], "is not an argen run"),
        ([str(tmp_path / "missing"), "--repo", "me/x"], "does not exist"),
        ([str(run_dir), "--repo", "me/bad name"], "not a valid Hub repository id"),
        ([str(run_dir), "--repo", "me/x/y"], "not a valid Hub repository id"),
        ([str(run_dir), "--repo", "me--/x"], "not a valid Hub repository id"),
        ([str(run_dir), "--repo", "no-owner"], "use owner/name"),
        ([str(run_dir), "--repo", "me/x", "--tokenizer", str(tmp_path / "nope")], "does not exist"),
    ]
    for args, message in cases:
        assert main(["push", *args]) == 2, args
        assert message in one_line_error(capsys), args
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(run_dir), "--repo", "me/x"]) == 2
    assert "no Hugging Face token" in one_line_error(capsys)
    assert not server.requests and not server.commits


def test_a_token_the_hub_refuses_is_one_line(stand_in, run_dir, capsys, monkeypatch):
    server, _ = stand_in
    server.refused.add("hf_revoked")
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    assert main(["push", str(run_dir), "--repo", "me/x"]) == 2
    err = one_line_error(capsys)
    assert "could not create the repository on the Hub for me/x" in err and "nothing was committed" in err
    assert not server.commits


def test_an_unreachable_hub_is_one_line(stand_in, run_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert main(["push", str(run_dir), "--repo", "me/x"]) == 2
    err = one_line_error(capsys)
    assert "could not create the repository on the Hub for me/x" in err and "nothing was committed" in err


def test_a_bundled_generator_records_its_tokenizer_by_name(tmp_path):
    from argen.checkpoint.bundled import bundled_path

    staged = tmp_path / "staged"
    assert main(["push", str(bundled_path("demo-c2i")), "--repo", "me/demo", "--stage", str(staged)]) == 0
    assert {p.name for p in staged.iterdir()} == {"README.md", "argen.json", "gpt.safetensors", "gpt.json",
                                                  "samples.png"}  # no tokenizer file: a reference to demo-vq
    assert json.loads((staged / "argen.json").read_text())["tokenizer"] == "demo-vq"
    assert Image.open(staged / "samples.png").size[0] > 64  # a grid made for the first classes
    assert default_tokenizer(staged) == "demo-vq"  # a staged folder loads like the repository
    assert argen.load_gpt(staged).sampling_defaults == argen.load_gpt("demo-c2i").sampling_defaults
    assert "argen sample --gpt hf://me/demo" in (staged / "README.md").read_text()


def test_tokenizer_that_does_not_fit_is_refused(run_dir, tmp_path):
    from dataclasses import replace

    from argen.models.tokenizer import VQModel, vq_config

    smaller = VQModel(replace(vq_config("VQ-tiny-16"), codebook_size=256))
    argen.save_tokenizer(smaller, tmp_path / "other")  # another codebook size
    other = find_model(run_dir)
    with pytest.raises(ArgenError, match="codes but the generator's vocabulary"):
        stage(other, "me/x", tmp_path / "s", tokenizer=str(tmp_path / "other"))
    other.info = {**other.info, "tokenizer": {"sha256": "0" * 64}}
    with pytest.raises(ArgenError, match="not the one the generator's codes were made with"):
        stage(other, "me/x", tmp_path / "s2")


def test_an_argen_lora_adapter_is_recognised(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "base_model_name_or_path": "demo-t2i",
        "argen": {"base": "demo-t2i", "kind": "t2i", "tokenizer": "demo-vq"}}))
    save_file({"base_model.model.layers.0.attention.wqkv.lora_A.weight": torch.zeros(4, 128)},
              str(adapter / "adapter_model.safetensors"))
    staged = tmp_path / "staged"
    assert main(["push", str(adapter), "--repo", "me/lora", "--stage", str(staged)]) == 0
    manifest = json.loads((staged / "argen.json").read_text())
    assert manifest["generator"] is None and manifest["adapter"]["base"] == "demo-t2i"
    assert manifest["tokenizer"] == "demo-vq"
    assert (staged / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert "LoRA adapter" in (staged / "README.md").read_text()
    with pytest.raises(ArgenError, match="holds a LoRA adapter, not a generator.*demo-t2i"):
        argen.load_gpt(staged)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ArgenError, match="without argen metadata"):
        find_model(adapter)
    save_file({"lora_A.weight": torch.zeros(4, 128)}, str(adapter / "adapter_model.safetensors"),
              metadata={"argen": json.dumps({"base": "demo-c2i"})})  # the metadata in the weights' header
    assert find_model(adapter).info["base"] == "demo-c2i"


def test_stage_refuses_a_folder_with_files_and_leaves_none_half_written(run_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["push", str(run_dir), "--repo", "me/x", "--stage", str(tmp_path / "full")]) == 2
    assert "already holds files" in one_line_error(capsys)
    assert main(["push", str(run_dir), "--repo", "me/x", "--stage", str(tmp_path / "s"),
                 "--grid", str(tmp_path / "no.png")]) == 2
    assert "--grid" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no staged folder, no temp folder
