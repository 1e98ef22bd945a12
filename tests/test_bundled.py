"""The generators that ship with argen: their files, and the commands that use them when given no --gpt."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import argen
from argen.checkpoint.bundled import BUNDLED, DEMO_DIR, bundled_path
from argen.cli.main import main
from argen.sampling.logits import SamplingParams
from argen.utils.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def recorded_sha256(file_name: str) -> str:
    text = (DEMO_DIR / "README.md").read_text()
    found = re.search(rf"`{re.escape(file_name)}` sha256 `([0-9a-f]{{64}})`", text)
    assert found, f"{file_name} has no sha256 recorded in argen/data/demo/README.md"
    return found.group(1)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_files_match_their_recorded_sha256(name):
    path = bundled_path(name)
    assert sha256_file(path) == recorded_sha256(path.name)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_bundled_generators_load_strictly_with_their_own_sampling_settings(kind):
    gpt = argen.load_gpt(f"demo-{kind}")  # load_strict: every key present and shaped as the config says
    assert gpt.config.kind == kind and gpt.config.vocab_size == 512 and gpt.config.image_size == 64
    assert next(gpt.parameters()).dtype == torch.float32  # stored in float16, loaded in the asked dtype
    assert gpt.sampling_defaults == _load_script().SAMPLING  # the settings the script exports
    assert gpt.sampling_defaults["cfg_scale"] == 4.0 and gpt.sampling_defaults["top_k"] == 50
    params = SamplingParams.for_model(gpt, top_k=7)
    assert (params.cfg_scale, params.temperature, params.top_k) == (4.0, 0.8, 7)  # a given setting wins
    tokenizer = argen.load_tokenizer("demo-vq")
    assert tokenizer.config.codebook_size == gpt.config.vocab_size


def test_a_generator_without_own_settings_gets_the_kind_defaults():
    gpt = argen.load_gpt("demo-c2i")
    gpt.sampling_defaults = None
    assert SamplingParams.for_model(gpt) == SamplingParams.for_kind("c2i")


def test_a_missing_bundled_file_is_a_clear_error(monkeypatch, tmp_path):
    import argen.checkpoint.bundled as bundled

    monkeypatch.setattr(bundled, "DEMO_DIR", tmp_path)
    with pytest.raises(argen.ArgenError, match="missing from this argen install"):
        argen.load_gpt("demo-c2i")


def test_sample_with_no_gpt_uses_the_bundled_generator_and_names_the_class(tmp_path, capsys):
    assert main(["sample", "--classes", "3", "--n", "2", "--out", str(tmp_path / "c"), "--save-codes",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "demo-c2i" in out and "3 = Flags" in out
    assert sorted(p.name for p in (tmp_path / "c").glob("0*.png")) == ["00000_class3.png", "00001_class3.png"]
    same = tmp_path / "same"
    assert main(["sample", "--gpt", "demo-c2i", "--tokenizer", "demo-vq", "--cfg-scale", "4", "--temperature", "0.8",
                 "--top-k", "50", "--classes", "3", "--n", "2", "--out", str(same), "--save-codes",
                 "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "c" / "codes.npy"), np.load(same / "codes.npy"))  # its own settings
    other = tmp_path / "other"
    assert main(["sample", "--classes", "3", "--n", "2", "--out", str(other), "--save-codes", "--cfg-scale", "4",
                 "--top-k", "2000", "--temperature", "1.0", "--no-progress"]) == 0
    assert not np.array_equal(np.load(tmp_path / "c" / "codes.npy"), np.load(other / "codes.npy"))


def test_sample_prompts_with_no_gpt_use_the_bundled_t2i_generator(tmp_path, capsys):
    assert main(["sample", "--prompts", "an emoji of fire", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "demo-t2i" in capsys.readouterr().out
    assert (tmp_path / "00000_an-emoji-of-fire.png").is_file()


def test_serve_with_no_model_flags_serves_the_bundled_t2i_generator_with_its_settings(monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}

    def fake_run(app, host, port, log_level):
        with TestClient(app) as client:
            served["models"] = client.get("/v1/models").json()
            served["image"] = client.post("/v1/images/generations", json={"prompt": "an emoji of fire", "n": 1,
                                                                           "response_format": "b64_json"})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--device", "cpu", "--port", "8137"]) == 0
    assert "demo-t2i" in capsys.readouterr().out
    model = served["models"]["data"][0]
    assert model["id"] == "demo-t2i" and model["argen"]["kind"] == "t2i"
    assert model["argen"]["defaults"]["cfg_scale"] == 4.0 and model["argen"]["defaults"]["top_k"] == 50
    assert served["image"].status_code == 200


def _load_script():
    path = ROOT / "scripts" / "train_demo_generators.py"
    spec = importlib.util.spec_from_file_location("train_demo_generators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_script_first_steps_are_reproducible(tmp_path):
    """Two runs of the script's own `argen train` command give the same weights, bit for bit."""
    import subprocess

    from safetensors.torch import load_file

    from argen.data.codes import CodeShardWriter

    script = _load_script()
    rng = np.random.default_rng(0)
    meta = {"kind": "c2i", "codebook_size": 512, "grid": [8, 8], "image_size": 64, "num_augs": 2, "num_classes": 10}
    writer = CodeShardWriter(tmp_path / "codes", meta)
    writer.write_shard(0, rng.integers(0, 512, (64, 2, 8, 8)), rng.integers(0, 10, 64))
    writer.finalize()
    files = []
    for run in ("a", "b"):
        cmd = script.train_command("c2i", tmp_path / "codes", tmp_path / run, steps=3, seed=0)
        assert cmd[cmd.index("--config") + 1] == "GPT-demo" and cmd[cmd.index("--max-steps") + 1] == "3"
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")})
        assert done.returncode == 0, done.stderr[-2000:]
        files.append(load_file(str(tmp_path / run / "gpt-c2i" / "gpt.safetensors")))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert sys.executable in script.train_command("t2i", tmp_path, tmp_path, 1, 0)
