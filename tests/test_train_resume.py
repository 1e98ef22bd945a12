"""Exact resume with the default settings (no --deterministic, two CPU threads): a training process killed
with SIGKILL (between steps, or in the middle of writing a checkpoint) and resumed ends with bit-identical
weights to an uninterrupted run, and two uninterrupted runs are identical; the same for a LoRA run (its
adapter files)."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_codes

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from argen.training import checkpointing
    from argen.training.generator import TrainConfig, train

    codes, out, kill_step, kill_in_save, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", \\
        sys.argv[5] == "1"
    base = sys.argv[6] if len(sys.argv) > 6 else None  # a LoRA run on this base

    def die(step):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_in_save:
        real = checkpointing.write_state
        def half_write(state, path):
            if state["step"] == kill_step:
                path.write_bytes(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            real(state, path)
        checkpointing.write_state = half_write

    cfg = TrainConfig(codes=codes, out=out, config="GPT-tiny", max_steps=10, batch_size=6, lr=1e-2, ema=True,
                      warmup=3, schedule="cosine", ckpt_every=2, keep=2, log_every=1,
                      tensorboard=False, progress=False, resume=resume, init_from=base, lora_rank=4 if base else None,
                      lora_dropout=0.1 if base else 0.0)
    train(cfg, on_step=None if kill_in_save else die)
""")


def _run(script, codes, out, kill_step=-1, kill_in_save=False, resume=False, base=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    args = [sys.executable, str(script), str(codes), str(out), str(kill_step), str(int(kill_in_save)),
            str(int(resume)), *([str(base)] if base else [])]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    codes = make_codes(root)  # 24 images: batches of 6 cross epoch boundaries
    script = root / "run.py"
    script.write_text(SCRIPT)
    full = _run(script, codes, root / "full")
    assert full.returncode == 0, full.stderr
    return root, codes, script


def _assert_same_weights(a_dir, b_dir, what, files=("gpt.safetensors", "raw/gpt.safetensors")):
    for name in files:
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (what, name, key)


def test_two_default_runs_are_identical(tmp_path, uninterrupted):
    root, codes, script = uninterrupted
    again = _run(script, codes, tmp_path / "again")
    assert again.returncode == 0, again.stderr
    _assert_same_weights(root / "full", tmp_path / "again", "run to run")


@pytest.mark.parametrize("kill_in_save", [False, True])
def test_sigkill_then_resume_is_exact(tmp_path, uninterrupted, kill_in_save):
    root, codes, script = uninterrupted
    # a step that is a checkpoint step when killing during the save, any step otherwise
    kill_step = random.Random().choice([4, 6, 8] if kill_in_save else range(1, 10))
    killed = _run(script, codes, tmp_path / "cut", kill_step=kill_step, kill_in_save=kill_in_save)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "gpt.safetensors").exists()
    resumed = _run(script, codes, tmp_path / "cut", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(root / "full", tmp_path / "cut", f"killed at step {kill_step}")


def test_lora_sigkill_then_resume_is_exact(tmp_path, uninterrupted):
    root, codes, script = uninterrupted
    from argen.checkpoint import save_gpt
    from argen.models.gpt import GPT, GPT_CONFIGS
    from conftest import randomize

    torch.manual_seed(0)
    save_gpt(randomize(GPT(GPT_CONFIGS["GPT-tiny"])), tmp_path / "base")  # a nonzero output head: gradients flow
    full = _run(script, codes, tmp_path / "full", base=tmp_path / "base")
    assert full.returncode == 0, full.stderr
    kill_step = random.Random().choice(range(1, 10))
    killed = _run(script, codes, tmp_path / "cut", kill_step=kill_step, base=tmp_path / "base")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = _run(script, codes, tmp_path / "cut", resume=True, base=tmp_path / "base")
    assert resumed.returncode == 0, resumed.stderr
    files = ("adapter_model.safetensors", "raw/adapter_model.safetensors")
    _assert_same_weights(tmp_path / "full", tmp_path / "cut", f"LoRA, killed at step {kill_step}", files)
    lora_b = load_file(str(tmp_path / "cut" / files[0]))["base_model.model.layers.1.attention.wo.lora_B.weight"]
    assert lora_b.abs().sum() > 0  # it trained
    # the training checkpoints hold the adapters (and their optimizer state), not the frozen base again
    newest = max((tmp_path / "cut" / "checkpoints").glob("step-*.pt"))
    assert newest.stat().st_size < (tmp_path / "base" / "gpt.safetensors").stat().st_size
