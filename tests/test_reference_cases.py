"""argen reproduces the published LlamaGen outputs (../shared/reference/llamagen) through the public API."""

from __future__ import annotations

import pytest
import torch

import argen
from reference_cases import case_params, load_case, rel_err, write_released_file


@pytest.fixture(scope="module")
def released_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("released")


@pytest.mark.parametrize("path", case_params("vq"))
def test_tokenizer_matches_reference(path, released_dir):
    case = load_case(path)
    file = write_released_file(case, released_dir / f"{path.stem}.pt")
    tok = argen.load_tokenizer(file, config=case["model"])
    images, expected = case["inputs"]["images"], case["expected"]

    codes = tok.encode(images)
    assert codes.shape == expected["indices"].shape and codes.dtype == torch.long
    assert (codes == expected["indices"]).float().mean() >= 0.99
    assert rel_err(tok.decode(expected["indices"]), expected["decoded_from_indices"]) <= 1e-4
    assert rel_err(tok.reconstruct(images), expected["reconstruction"]) <= 1e-4


@pytest.fixture(scope="module", params=case_params("gpt"))
def gpt_case(request, released_dir):
    path = request.param
    case = load_case(path)
    file = write_released_file(case, released_dir / f"{path.stem}.pt")
    cfg = case["config"]
    grid = int(cfg["block_size"] ** 0.5)
    gpt = argen.load_gpt(file, config=case["model"], kind=cfg["model_type"], image_size=grid * 16, downsample=16)
    file.unlink()
    return case, gpt


def test_gpt_teacher_forcing_matches_reference(gpt_case):
    case, gpt = gpt_case
    inputs, expected = case["inputs"], case["expected"]
    assert not gpt.training
    with torch.no_grad():
        logits = gpt.logits(inputs["tokens"], inputs["cond"], inputs["emb_masks"])
    assert logits.dtype == torch.float32
    assert rel_err(logits[:, expected["logits_at"]], expected["logits"]) <= 1e-4
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["tokens"].flatten())
    assert abs(float(loss) - float(expected["loss"])) <= 1e-4
    assert (logits.argmax(-1) == expected["argmax"]).float().mean() >= 0.999
    assert rel_err(logits.logsumexp(-1), expected["logsumexp"]) <= 1e-4


def test_gpt_training_forward_loss_matches_reference(gpt_case):
    case, gpt = gpt_case
    inputs = case["inputs"]
    with torch.no_grad():
        _, loss = gpt(inputs["tokens"], inputs["cond"], inputs["emb_masks"])
    assert abs(float(loss) - float(case["expected"]["loss"])) <= 1e-4


def test_greedy_guided_generation_matches_reference(gpt_case):
    case, gpt = gpt_case
    inputs, expected = case["inputs"], case["expected"]["generated"]
    settings = inputs["generate"]
    codes = argen.generate(gpt, inputs["cond"], inputs["emb_masks"], cfg_scale=settings["cfg_scale"],
                           temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
                           generator=torch.Generator().manual_seed(0), max_new_tokens=settings["max_new_tokens"])
    assert codes.shape == expected.shape
    assert torch.equal(codes.long(), expected.long())
