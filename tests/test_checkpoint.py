"""Checkpoint loading: released containers, strictness, corrupt files, argen's self-describing format."""

from __future__ import annotations

import pytest
import torch

import argen
from argen.checkpoint import build_gpt_config
from argen.utils.errors import ArgenError, CheckpointError
from conftest import save_released, tiny_gpt, tiny_tokenizer

RELEASED_FLAGS = dict(config="GPT-tiny", kind="c2i", image_size=64, downsample=16)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("container", ["model", "module", "state_dict", "ema", None])
def test_released_containers_load(tmp_path, container):
    gpt = tiny_gpt()
    path = save_released(gpt, tmp_path / "ckpt.pt", container)
    loaded = argen.load_gpt(path, **RELEASED_FLAGS)
    assert same_weights(gpt, loaded)
    assert not loaded.training


def test_released_file_with_derived_freqs_cis_loads(tmp_path):
    gpt = tiny_gpt()
    state = dict(gpt.state_dict(), freqs_cis=torch.zeros(17, 8, 2))
    torch.save({"model": state}, tmp_path / "old.pt")
    assert same_weights(gpt, argen.load_gpt(tmp_path / "old.pt", **RELEASED_FLAGS))


class NotAllowed:
    """A class a weights file must not be able to instantiate."""


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    gpt = tiny_gpt()
    torch.save({"model": gpt.state_dict(), "evil": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not allowed"):
        argen.load_gpt(tmp_path / "evil.pt", **RELEASED_FLAGS)


def test_mismatched_config_names_keys(tmp_path):
    path = save_released(tiny_gpt(), tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError) as info:
        argen.load_gpt(path, config="GPT-tiny", kind="t2i", image_size=64, downsample=16)
    message = str(info.value)
    assert "'GPT-tiny'" in message and "kind=t2i" in message
    assert "cls_embedding.embedding_table.weight" in message and "cls_embedding.cap_proj.fc1.weight" in message
    assert "missing" in message and "unexpected" in message


def test_misshaped_key_is_named(tmp_path):
    gpt = tiny_gpt()
    state = gpt.state_dict()
    state["norm.weight"] = torch.ones(3)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"norm.weight: file \(3,\) vs model \(64,\)"):
        argen.load_gpt(tmp_path / "bad.pt", **RELEASED_FLAGS)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_released_file_is_a_clear_error(tmp_path, damage):
    path = save_released(tiny_gpt(), tmp_path / "ckpt.pt")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        argen.load_gpt(path, **RELEASED_FLAGS)


def test_corrupt_argen_file_is_a_clear_error(tmp_path):
    file = argen.save_gpt(tiny_gpt(), tmp_path / "run")
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        argen.load_gpt(tmp_path / "run")


def test_missing_file_and_unknown_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        argen.load_gpt(tmp_path / "nope.pt", **RELEASED_FLAGS)
    path = save_released(tiny_gpt(), tmp_path / "ckpt.pt")
    with pytest.raises(ArgenError, match="unknown generator config 'GPT-Q'"):
        argen.load_gpt(path, config="GPT-Q")
    with pytest.raises(ArgenError, match="pass the generator config"):
        argen.load_gpt(path)
    with pytest.raises(ArgenError, match="unknown tokenizer config"):
        argen.load_tokenizer(path, config="VQ-99")


def test_image_size_must_be_multiple_of_downsample():
    with pytest.raises(ArgenError, match="not a multiple"):
        build_gpt_config("GPT-tiny", image_size=70, downsample=16)


def test_argen_format_round_trip_needs_no_flags(tmp_path):
    gpt = tiny_gpt("t2i")
    file = argen.save_gpt(gpt, tmp_path / "run")
    assert file.name == "gpt.safetensors" and file.with_suffix(".json").is_file()
    for path in (tmp_path / "run", file):
        loaded = argen.load_gpt(path)
        assert loaded.config == gpt.config and same_weights(gpt, loaded)
    tok = tiny_tokenizer()
    tok_file = argen.save_tokenizer(tok, tmp_path / "run")
    assert same_weights(tok, argen.load_tokenizer(tmp_path / "run"))
    assert same_weights(tok, argen.load_tokenizer(tok_file))
    with pytest.raises(CheckpointError, match="not a 'vq' model"):
        argen.load_tokenizer(file)


def test_argen_file_with_a_different_named_config_is_refused(tmp_path):
    argen.save_gpt(tiny_gpt(), tmp_path / "run")
    assert argen.load_gpt(tmp_path / "run", config="GPT-tiny").config.name == "GPT-tiny"
    with pytest.raises(CheckpointError, match="holds generator config 'GPT-tiny'.*not 'GPT-B'"):
        argen.load_gpt(tmp_path / "run", config="GPT-B")
    with pytest.raises(CheckpointError, match="is a c2i generator, not t2i"):
        argen.load_gpt(tmp_path / "run", kind="t2i")


def test_argen_file_can_sample_at_another_resolution(tmp_path):
    argen.save_gpt(tiny_gpt(), tmp_path / "run")
    bigger = argen.load_gpt(tmp_path / "run", image_size=128)
    assert bigger.config.num_image_tokens == 64


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    import errno

    import argen.checkpoint.loading as loading

    gpt = tiny_gpt()
    file = argen.save_gpt(gpt, tmp_path / "run")
    before = file.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "save_file", full_disk)
    with pytest.raises(ArgenError, match="no space left"):
        argen.save_gpt(tiny_gpt(seed=3), tmp_path / "run")
    assert file.read_bytes() == before
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


def test_released_tokenizer_needs_config(tmp_path):
    tok = tiny_tokenizer(seed=4)
    path = save_released(tok, tmp_path / "vq.pt")
    with pytest.raises(ArgenError, match="tokenizer config"):
        argen.load_tokenizer(path)
    loaded = argen.load_tokenizer(path, config="VQ-tiny-16")
    assert same_weights(tok, loaded) and not loaded.training
