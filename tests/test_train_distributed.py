"""Under torchrun with the gloo backend on the CPU, 2 processes (DDP, and FSDP2 with sharded optimizer
state) train to the same weights as 1 process with the same global batch, and resume across strategies; so do
LoRA runs (their adapters)."""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from test_train import make_codes

ARGS = ["--config", "GPT-tiny", "--batch-size", "8", "--lr", "0.01", "--dropout", "0", "--ema", "--ema-decay",
        "0.9", "--warmup", "2", "--ckpt-every", "2", "--no-tensorboard", "--no-progress", "--log-every", "1"]


def _train(codes, out, steps, nproc=1, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        launcher = [sys.executable, "-m", "argen.cli.main"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "argen.cli.main"]
    cmd = [*launcher, "train", "--codes", str(codes), "--out", str(out), "--max-steps", str(steps), *ARGS, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _max_diff(a_dir, b_dir, name="gpt.safetensors"):
    a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    codes = make_codes(root)
    _train(codes, root / "one", 5)
    return root, codes


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    root, codes = single
    out = tmp_path / strategy
    if strategy == "fsdp":  # stop early, then resume the sharded state to 5 steps
        _train(codes, out, 3, nproc=2, extra=["--strategy", strategy])
        _train(codes, out, 5, nproc=2, extra=["--strategy", strategy, "--resume"])
    else:
        _train(codes, out, 5, nproc=2, extra=["--strategy", strategy])
    assert load_file(str(out / "raw" / "gpt.safetensors"))["output.weight"].abs().sum() > 0  # it trained
    assert _max_diff(root / "one", out) < 1e-5
    assert _max_diff(root / "one", out, "raw/gpt.safetensors") < 1e-5


@pytest.fixture(scope="module")
def single_lora(single):
    import torch

    from argen.checkpoint import save_gpt
    from argen.models.gpt import GPT, GPT_CONFIGS
    from conftest import randomize

    root, codes = single
    torch.manual_seed(0)
    save_gpt(randomize(GPT(GPT_CONFIGS["GPT-tiny"])), root / "base")
    # the finetune recipe (--init-from) has its own token dropout: off, as in ARGS, so ranks draw no dropout
    extra = ["--init-from", str(root / "base"), "--lora-rank", "4", "--token-dropout", "0"]
    _train(codes, root / "one-lora", 5, extra=extra)
    return root, codes, extra


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_two_processes_match_one(single_lora, tmp_path, strategy):
    root, codes, extra = single_lora
    out = tmp_path / strategy
    _train(codes, out, 3, nproc=2, extra=[*extra, "--strategy", strategy])
    _train(codes, out, 5, nproc=2, extra=[*extra, "--strategy", strategy, "--resume"])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter["base_model.model.layers.0.feed_forward.w2.lora_B.weight"].abs().sum() > 0  # it trained
    assert _max_diff(root / "one-lora", out, "adapter_model.safetensors") < 1e-5
    assert _max_diff(root / "one-lora", out, "raw/adapter_model.safetensors") < 1e-5
