"""PackedLinear / pack_linears: the oneDNN-packed CPU linear agrees with F.linear, a row's result does
not depend on the batch, the packed copy follows weight edits and casts, autograd and the engine work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from argen.engine import generate
from argen.models.gpt import GPT, gpt_config
from argen.nn.packed import PackedLinear, is_packed, pack_linears
from argen.nn.quant import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def packed_pair(in_features=96, out_features=80, dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(dtype)
    return linear, PackedLinear.from_linear(linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_f_linear(dtype):
    linear, packed = packed_pair(dtype=dtype)
    x = torch.randn(5, 3, 96).to(dtype)
    with torch.inference_mode():
        got, expected = packed(x), F.linear(x, linear.weight)
    assert got.shape == (5, 3, 80) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert packed.weight is linear.weight


def test_a_rows_result_does_not_depend_on_the_batch():
    _, packed = packed_pair(768, 256)
    x = torch.randn(640, 768)
    with torch.inference_mode():
        full = packed(x)
        for rows in list(range(1, 65)) + [100, 257]:
            assert torch.equal(packed(x[:rows]), full[:rows]), rows


def test_the_packed_copy_follows_edits_and_casts():
    linear, packed = packed_pair()
    x = torch.randn(4, 96)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        linear.weight.mul_(2.0)  # in place: the version counter moves
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), 2 * before, rtol=1e-5, atol=1e-5)
    packed.to(torch.bfloat16)
    with torch.inference_mode():
        got = packed(x.bfloat16())
    torch.testing.assert_close(got.float(), 2 * before, rtol=3e-2, atol=3e-2)


def test_autograd_falls_back_to_f_linear():
    linear, packed = packed_pair()
    x = torch.randn(4, 96, requires_grad=True)
    packed(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None


def test_pack_linears_swaps_plain_linears_only():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-tiny")).eval()
    quantize_int8(model.layers[0])
    weight = model.output.weight
    pack_linears(model, skip=("layers.1.attention.wo",))
    assert is_packed(model) and model.output.weight is weight
    assert isinstance(model.layers[0].attention.wqkv, Int8Linear)
    assert isinstance(model.layers[1].attention.wqkv, PackedLinear)
    assert type(model.layers[1].attention.wo) is nn.Linear
    assert "output.weight" in model.state_dict() and not any("packed" in k for k in model.state_dict())


def test_engine_logits_and_tokens_with_packed_linears():
    torch.manual_seed(0)
    model = GPT(gpt_config("GPT-tiny")).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    cond = torch.tensor([1, 2, 3])
    tokens = generate(model, cond, cfg_scale=2.0, top_k=1)
    prefix = torch.randint(0, model.config.vocab_size, (3, 16))
    with torch.inference_mode():
        expected = model.logits(prefix, cond)
        pack_linears(model)
        got = model.logits(prefix, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    agree = (generate(model, cond, cfg_scale=2.0, top_k=1) == tokens).float().mean().item()
    assert agree >= 0.9  # the same greedy tokens up to the rare near-tie the last bits can flip


def test_every_sampling_command_loads_packed_kernels_when_asked(tmp_path):
    """`--cpu-kernels packed` on sample, sample-batch, serve and edit packs the float linears (int8 ones
    stay int8); aten, the default, leaves plain linears."""
    import argen
    from argen.cli.common import load_models
    from argen.cli.main import build_parser
    from conftest import tiny_gpt, tiny_tokenizer

    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    commands = (("sample", ["--classes", "0"]), ("serve", []),
                ("edit", ["--image", "x.png", "--box", "0,0,16,16", "--classes", "0"]),
                ("sample-batch", ["--out", str(tmp_path / "o"), "--num-samples", "2"]))
    for command, extra in commands:
        common = [command, "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"), "--device", "cpu",
                  *extra]
        for flags, wqkv, head in ((["--cpu-kernels", "packed"], PackedLinear, PackedLinear), ([], nn.Linear, nn.Linear),
                                  (["--cpu-kernels", "packed", "--quantize", "int8"], Int8Linear, PackedLinear)):
            args = build_parser([command]).parse_args([*common, *flags])
            _, gpt, _, _ = load_models(args)
            assert type(gpt.layers[0].attention.wqkv) is wqkv, (command, flags)
            assert type(gpt.output) is head, (command, flags)


def test_bad_cpu_kernels_are_refused(tmp_path, capsys):
    import argen
    from argen.checkpoint.loading import load_gpt
    from argen.cli.main import main
    from argen.utils.errors import ArgenError
    from conftest import tiny_gpt

    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    with pytest.raises(ArgenError, match="choose from aten, packed"):
        load_gpt(tmp_path / "gpt", cpu_kernels="mkl")
    with pytest.raises(ArgenError, match="for a CPU model"):
        load_gpt(tmp_path / "gpt", cpu_kernels="packed", device="cuda")
    assert is_packed(load_gpt(tmp_path / "gpt", cpu_kernels="packed"))
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--gpt", "x", "--cpu-kernels", "fast"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice: 'fast'" in err and len(err.strip().splitlines()) == 1
