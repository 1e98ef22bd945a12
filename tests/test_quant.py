"""Int8 weight-only decoding (`argen.nn.quant`, `load_gpt(quantize="int8")`, `--quantize`): the layer
computes what its dequantised weight says, the model keeps its decisions, every sampler runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import argen
from argen.checkpoint import load_gpt, quantize_gpt, save_gpt
from argen.engine import Engine, JacobiSlotDecoder, SlotDecoder, SlotRequest
from argen.nn.quant import Int8Linear, quantize_int8, quantize_per_channel, weight_bytes
from argen.sampling import SamplingParams, reference_generate
from argen.utils.errors import ArgenError
from conftest import tiny_gpt


def linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():  # channels of very different sizes: one scale per channel matters
        layer.weight.mul_(torch.logspace(-2, 1, out_features)[:, None])
    return layer


def test_per_channel_quantisation_rounds_each_channel_to_its_own_grid():
    weight = linear(64, 48).weight
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((48,), 127, dtype=torch.int8))  # symmetric, full range
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("in_features", [64, 60])  # 60: not a multiple of 8, the dequantising path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 17])
def test_int8_linear_matches_the_dequantised_matmul(in_features, dtype, rows):
    layer = Int8Linear.from_linear(linear(in_features, 48)).to(dtype)
    x = torch.randn(2, rows, in_features).to(dtype)
    out = layer(x)
    assert out.shape == (2, rows, 48) and out.dtype == dtype
    # the reference: the dequantised weight against the activations as the kernel reads them (bf16 on the CPU path)
    read = x.bfloat16() if in_features % 8 == 0 else x
    want = F.linear(read.double(), layer.dequantized_weight().double())
    error = (out.double() - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)
    assert error.max() < (1e-2 if dtype == torch.bfloat16 or in_features % 8 == 0 else 1e-5)
    wrong = F.linear(read.double(), layer.dequantized_weight().double().flip(0))  # the test can fail
    assert ((out.double() - wrong).abs().amax(dim=-1) / wrong.abs().amax(dim=-1)).min() > 0.1


def test_int8_linear_rows_do_not_depend_on_the_batch():
    layer = Int8Linear.from_linear(linear(64, 96))
    x = torch.randn(9, 64)
    full = layer(x)
    for start, stop in ((0, 1), (3, 4), (2, 7)):
        assert torch.equal(layer(x[start:stop]), full[start:stop])


def test_quantize_int8_swaps_bias_free_linears_in_place_and_skips_named_ones():
    model = nn.Sequential(linear(64, 32), nn.Linear(32, 16), linear(32, 8))
    same = quantize_int8(model, skip=("2",))
    assert same is model
    assert isinstance(model[0], Int8Linear)
    assert type(model[1]) is nn.Linear  # has a bias
    assert type(model[2]) is nn.Linear  # skipped by name


def save_tiny(tmp_path, kind="c2i"):
    model = tiny_gpt(kind)
    save_gpt(model, tmp_path / "gpt")
    return model, tmp_path / "gpt"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_gpt_int8_quantises_the_block_linears_only(tmp_path, dtype):
    fp32, path = save_tiny(tmp_path)
    model = load_gpt(path, quantize="int8", dtype=dtype)
    block_linears = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert block_linears and all(isinstance(m, Int8Linear) for m in block_linears)
    assert all(m.weight_int8.dtype == torch.int8 and m.scale.dtype == dtype for m in block_linears)
    assert type(model.output) is nn.Linear and model.output.weight.dtype == dtype  # the head stays
    assert model.tok_embeddings.weight.dtype == dtype
    first = model.layers[0].attention.wqkv
    want, _ = quantize_per_channel(fp32.layers[0].attention.wqkv.weight)  # from the file's float32 values
    assert torch.equal(first.weight_int8, want)
    plain = load_gpt(path, dtype=dtype)
    assert weight_bytes(model) < weight_bytes(plain)
    assert load_gpt(path, quantize="none").layers[0].attention.wqkv.weight.dtype == torch.float32


def test_quantize_gpt_head_and_unknown_modes(tmp_path):
    _, path = save_tiny(tmp_path)
    model = quantize_gpt(load_gpt(path), "int8", head=True)
    assert isinstance(model.output, Int8Linear)
    with pytest.raises(ArgenError, match="save the float model"):
        save_gpt(model, tmp_path / "int8")
    for bad in ("int4", "fp8"):
        with pytest.raises(ArgenError, match="choose from none, int8"):
            load_gpt(path, quantize=bad)


def teacher_forced_agreement(model, quantized, kind: str) -> float:
    torch.manual_seed(3)
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.num_image_tokens))
    cond = torch.arange(8) % cfg.num_classes if kind == "c2i" else torch.randn(8, cfg.caption_len, cfg.caption_dim)
    with torch.no_grad():
        want, got = model.logits(tokens, cond).argmax(-1), quantized.logits(tokens, cond).argmax(-1)
    return (want == got).float().mean().item()


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_teacher_forced_argmax_agrees_with_float32(kind):
    model = tiny_gpt(kind, image_size=128)  # 64 tokens a sequence
    quantized = quantize_gpt(tiny_gpt(kind, image_size=128), "int8")
    assert teacher_forced_agreement(model, quantized, kind) >= 0.95  # random weights: many near-ties
    crude = tiny_gpt(kind, image_size=128)  # the check can fail: 2-level weights disagree far more often
    for layer in crude.layers.modules():
        if isinstance(layer, nn.Linear):
            layer.weight.data = layer.weight.sign() * layer.weight.abs().mean(dim=1, keepdim=True)
    assert teacher_forced_agreement(model, crude, kind) < 0.5


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_engine_runs_the_quantised_model_math(kind):
    """Greedy engine tokens equal the reference sampler's on the same int8 model: the engine adds no math."""
    model = quantize_gpt(tiny_gpt(kind), "int8")
    cfg = model.config
    cond = torch.arange(3) if kind == "c2i" else torch.randn(3, cfg.caption_len, cfg.caption_dim)
    want = reference_generate(model, cond, cfg_scale=2.0, top_k=1)
    assert torch.equal(Engine(model).generate(cond, params=SamplingParams(cfg_scale=2.0, top_k=1)), want)
    assert torch.equal(argen.generate(model, cond, cfg_scale=2.0, top_k=1, decode="jacobi", window=3), want)


def test_slot_schedulers_run_the_quantised_model():
    model = quantize_gpt(tiny_gpt("c2i"), "int8")
    params = SamplingParams(cfg_scale=2.0, top_k=1)
    want = reference_generate(model, torch.arange(3), cfg_scale=2.0, top_k=1)
    for decoder in (SlotDecoder(model, 2), JacobiSlotDecoder(model, 2, window=3)):
        requests = [SlotRequest(torch.tensor(i), None, params, torch.Generator().manual_seed(i)) for i in range(3)]
        assert torch.equal(torch.stack(decoder.run(requests)), want)


def test_bf16_int8_model_samples_through_the_engine():
    model = quantize_gpt(tiny_gpt("c2i"), "int8").to(torch.bfloat16)
    tokens = argen.generate(model, torch.arange(2), cfg_scale=2.0, top_k=20, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, model.config.num_image_tokens)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.config.vocab_size


def cli_exit_code(argv) -> int:
    from argen.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def test_sample_quantize_int8_writes_the_int8_models_images(tmp_path):
    from conftest import tiny_tokenizer

    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    flags = ["sample", "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"), "--classes", "0,3",
             "--device", "cpu", "--top-k", "1", "--cfg-scale", "2.0", "--save-codes"]
    assert cli_exit_code([*flags, "--quantize", "int8", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "00000_class0.png").is_file()
    codes = torch.from_numpy(np.load(tmp_path / "q" / "codes.npy"))
    int8 = load_gpt(tmp_path / "gpt", quantize="int8")
    assert torch.equal(codes, argen.generate(int8, torch.tensor([0, 3]), cfg_scale=2.0, top_k=1))


def test_every_sampling_command_loads_the_int8_model_it_is_asked_for(tmp_path):
    from argen.cli.common import load_models
    from argen.cli.main import build_parser
    from conftest import tiny_tokenizer

    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    commands = (("sample", ["--classes", "0"]), ("serve", []),
                ("sample-batch", ["--out", str(tmp_path / "o"), "--num-samples", "2"]))
    for command, extra in commands:
        common = [command, "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"), "--device", "cpu",
                  *extra]
        for quantize, layer in (("int8", Int8Linear), ("none", nn.Linear)):
            args = build_parser([command]).parse_args([*common, "--quantize", quantize])
            _, gpt, _, _ = load_models(args)
            assert type(gpt.layers[0].attention.wqkv) is layer


@pytest.mark.parametrize("command", ["sample", "sample-batch", "serve"])
@pytest.mark.parametrize("value", ["int4", "fp8", "INT8"])
def test_unsupported_quantize_is_one_line_and_exit_2(capsys, command, value):
    rc = cli_exit_code([command, "--gpt", "x", "--quantize", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"argument --quantize: invalid choice: '{value}' (choose from 'none', 'int8')" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
