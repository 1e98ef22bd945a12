"""Training parts shared by both trainers: safe state files, checkpoint fallback, locks, EMA, batch order."""

import os

import pytest
import torch

from argen.training.tokenizer import TokenizerTrainConfig, train_tokenizer
from argen.utils.errors import ArgenError
from argen.utils.torch_utils import load_torch_file
from test_train import make_codes, quick


class _Marker:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path, marker):
    torch.save({"step": 1, "model": {}, "payload": _Marker(marker)}, path)


def _tokenizer_cfg(out, **kw):
    base = dict(out=str(out), data="demo", config="VQ-tiny", image_size=16, batch_size=4, max_steps=2,
                perceptual_weight=0.0, use_disc=False, ckpt_every=1, log_every=1, progress=False)
    base.update(kw)
    return TokenizerTrainConfig(**base)


def _bad_files(tmp_path):
    """(label, writer) for every kind of bad training-state file: crafted pickle, random bytes, truncated."""
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(4096)}, good)
    data = good.read_bytes()
    return {
        "crafted": lambda path, marker: _crafted(path, marker),
        "random": lambda path, marker: path.write_bytes(os.urandom(4096)),
        "truncated": lambda path, marker: path.write_bytes(data[: len(data) // 2]),
    }


def _check_refusal(exc, label, marker):
    message = str(exc.value)
    assert "\n" not in message
    assert not marker.exists(), "the crafted file's code ran"
    assert "weights_only" not in message
    if label == "crafted":
        assert "not allowed" in message and "io.open" in message
    else:
        assert "corrupt" in message


@pytest.mark.parametrize("label", ["crafted", "random", "truncated"])
def test_tokenizer_state_file_is_loaded_safely(tmp_path, label):
    out = tmp_path / "run"
    train_tokenizer(_tokenizer_cfg(out))
    marker = tmp_path / "marker"
    for path in (out / "checkpoints").glob("step-*.pt"):  # every checkpoint bad: nothing to fall back to
        _bad_files(tmp_path)[label](path, marker)
    with pytest.raises(ArgenError) as exc:
        train_tokenizer(_tokenizer_cfg(out, resume=True, max_steps=3))
    _check_refusal(exc, label, marker)


def test_tokenizer_run_of_the_old_format_is_refused(tmp_path):
    """A run directory of the previous layout (train_state.pt, never unpickled) is refused clearly."""
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "marker"
    _crafted(out / "train_state.pt", marker)
    for resume in (True, False):
        with pytest.raises(ArgenError, match="older argen"):
            train_tokenizer(_tokenizer_cfg(out, resume=resume))
    assert not marker.exists()


@pytest.mark.parametrize("label", ["crafted", "random", "truncated"])
def test_generator_checkpoint_is_loaded_safely(tmp_path, label):
    from argen.training.generator import train

    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    train(quick(codes, out, max_steps=2, ckpt_every=1, keep=1))
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000002.pt"]
    marker = tmp_path / "marker"
    _bad_files(tmp_path)[label](ckpts[0], marker)
    with pytest.raises(ArgenError) as exc:
        train(quick(codes, out, max_steps=3, resume=True, keep=1))
    _check_refusal(exc, label, marker)


def test_load_torch_file_names_refused_globals_and_allows_listed(tmp_path):
    marker = tmp_path / "marker"
    _crafted(tmp_path / "x.pt", marker)
    with pytest.raises(ArgenError, match=r"not allowed \(io\.open\)"):
        load_torch_file(tmp_path / "x.pt")
    assert not marker.exists()
    with pytest.raises(ArgenError, match="does not exist"):
        load_torch_file(tmp_path / "missing.pt")
    import argparse

    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "ns.pt")
    with pytest.raises(ArgenError, match="argparse.Namespace"):
        load_torch_file(tmp_path / "ns.pt")
    assert load_torch_file(tmp_path / "ns.pt", allowed=[argparse.Namespace])["args"].a == 1


def test_quantizer_backward_is_deterministic_with_threads():
    """Repeated codes: the codebook gradient must not depend on how CPU threads interleave (it did with
    `codebook[codes]`, whose backward is a multi-threaded atomic add)."""
    from argen.nn.quantizer import VectorQuantizer

    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        quantizer = VectorQuantizer(64, 8, l2_norm=False).train()
        g = torch.Generator().manual_seed(0)
        z = torch.randn(16, 8, 32, 32, generator=g)  # 16,384 codes over 64 entries
        upstream = torch.randn(16, 8, 32, 32, generator=g)
        grads = set()
        for _ in range(12):
            quantizer.zero_grad(set_to_none=True)
            out = quantizer(z)
            ((out.quantized * upstream).sum() + out.codebook_loss).backward()
            grads.add(quantizer.embedding.weight.grad.numpy().tobytes())
        assert len(grads) == 1
    finally:
        torch.set_num_threads(old)


def test_batch_order_covers_epochs_and_resumes():
    from argen.training.parts import BatchOrder

    a = BatchOrder(10, 4, seed=3)
    first = torch.cat([a.next()[1] for _ in range(5)])  # 2 epochs; batch 2 runs across the first epoch end
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert a.batch(2)[0].tolist() == [0, 0, 1, 1] and a.epoch == 2
    b = BatchOrder(10, 4, seed=3)
    b.next(), b.next()
    c = BatchOrder(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(b.next(), c.next()))
    assert [k for k, _ in zip(BatchOrder(10, 4, seed=3).keys(2), range(9))] == [
        list(zip(*(t.tolist() for t in a.batch(s)))) for s in (0, 1)]
    assert not torch.equal(BatchOrder(10, 4, seed=4).batch(0)[1], a.batch(0)[1])
    for changed in (BatchOrder(11, 4, seed=3), BatchOrder(10, 5, seed=3), BatchOrder(10, 4, seed=0)):
        with pytest.raises(ArgenError, match="data order differs"):
            changed.load_state_dict(b.state_dict())
    old_rule = {**b.state_dict(), "rule": "v1"}
    with pytest.raises(ArgenError, match="rule"):
        BatchOrder(10, 4, seed=3).load_state_dict(old_rule)


# ---------------------------------------------------------------------- issue 10: full disk, corrupt latest, lock
def _generator_run(tmp_path, **kw):
    from argen.training.generator import train

    codes = tmp_path / "codes" if (tmp_path / "codes").is_dir() else make_codes(tmp_path)
    base = dict(max_steps=2, ckpt_every=1, keep=3)
    base.update(kw)
    return train(quick(codes, tmp_path / "run", **base))


def _tokenizer_run(tmp_path, **kw):
    base = dict(max_steps=2, ckpt_every=1)
    base.update(kw)
    return train_tokenizer(_tokenizer_cfg(tmp_path / "run", **base))


TRAINERS = {"generator": _generator_run, "tokenizer": _tokenizer_run}
WEIGHTS = {"generator": "gpt.safetensors", "tokenizer": "tokenizer.safetensors"}


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_full_disk_during_a_checkpoint_names_the_disk_and_the_space(tmp_path, monkeypatch, trainer):
    from argen.training import checkpointing

    run = TRAINERS[trainer]
    run(tmp_path)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}

    def full_disk(state, path):  # what torch.save raises when the disk fills under it
        path.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4030")

    monkeypatch.setattr(checkpointing, "write_state", full_disk)
    with pytest.raises(ArgenError) as exc:
        run(tmp_path, max_steps=4, resume=True)
    message = str(exc.value)
    assert "\n" not in message and "no space left on device" in message and "mounted at" in message
    import re

    needed = re.search(r"free, ([\d.]+) (B|KiB|MiB) needed", message)  # the checkpoint's size is known ...
    assert needed and "more than" not in message, message
    kib = float(needed.group(1)) / {"B": 1024, "KiB": 1, "MiB": 1 / 1024}[needed.group(2)]
    on_disk = max(len(v) for v in before.values()) / 1024
    assert 0.5 * on_disk < kib < 1.5 * on_disk, (kib, on_disk)  # ... and close to what a checkpoint takes
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before  # nothing lost, no temp file left


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_resume_falls_back_past_a_corrupt_latest_checkpoint(tmp_path, caplog, trainer):
    run = TRAINERS[trainer]
    straight = tmp_path / "straight"
    straight.mkdir()
    if trainer == "generator":
        make_codes(straight)
    run(straight, max_steps=3)
    run(tmp_path)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    latest = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    assert latest.name == "step-00000002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="argen.training"):
        run(tmp_path, max_steps=3, resume=True)
    assert "resuming from" in caplog.text and "step-00000001.pt" in caplog.text and "step-00000002.pt" in caplog.text
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "run" / WEIGHTS[trainer])), load_file(str(tmp_path / "run" / WEIGHTS[trainer]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_HOLD = """
import sys, time
from argen.utils.io import run_lock
with run_lock(sys.argv[1], "argen test-holder"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_a_second_writer_of_a_run_directory_is_refused(tmp_path, trainer):
    import subprocess
    import sys

    run = TRAINERS[trainer]
    run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArgenError, match=rf"in use by pid {holder.pid} \(argen test-holder\)"):
            run(tmp_path, max_steps=3, resume=True)
    finally:
        holder.kill()
        holder.wait()
    run(tmp_path, max_steps=3, resume=True)  # the lock went with its process


def test_generator_checkpoint_of_the_old_format_is_refused(tmp_path):
    from argen.training.generator import train

    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    train(quick(codes, out, max_steps=2, ckpt_every=1, keep=1))
    path = out / "checkpoints" / "step-00000002.pt"
    torch.save({"step": 2, "model": {}, "sampler": {"epoch": 0, "pos": 0}, "data_gen": torch.zeros(3)}, path)
    with pytest.raises(ArgenError, match="another version of argen"):
        train(quick(codes, out, max_steps=3, resume=True, keep=1))


def test_ema_with_and_without_warmup_and_its_state():
    from argen.training.parts import EMA

    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    start = {k: v.clone() for k, v in model.named_parameters()}
    plain, warm = EMA(model, 0.9), EMA(model, 0.9, warmup=True)
    assert plain.names == ["weight", "bias"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    plain.update(model, step=0)
    warm.update(model, step=0)  # decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(plain.state_dict()["weight"], start["weight"] + 0.1)
    torch.testing.assert_close(warm.state_dict()["weight"], start["weight"] + 0.9)
    again = EMA(torch.nn.Linear(3, 2), 0.9)
    again.load_state_dict(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.shadow, plain.shadow))
    with pytest.raises(ArgenError, match="lacks 1 parameters"):
        again.load_state_dict({"weight": plain.state_dict()["weight"]})


def test_resolve_precision():
    from argen.training.parts import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, cpu, True) == resolve_precision("auto", cpu, False) == torch.float32
    assert resolve_precision("auto", cuda, False) == torch.bfloat16 and resolve_precision("bf16", cpu, False)
    assert resolve_precision("fp16", cuda, True) == torch.float16
    with pytest.raises(ArgenError, match="needs CUDA"):
        resolve_precision("fp16", cpu, True)
    with pytest.raises(ArgenError, match="not supported by this trainer"):
        resolve_precision("fp16", cuda, False)
    with pytest.raises(ArgenError, match="unknown dtype"):
        resolve_precision("fp8", cpu, True)


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_a_run_leaves_the_callers_torch_state_alone(tmp_path, trainer):
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    was = torch.are_deterministic_algorithms_enabled()
    TRAINERS[trainer](tmp_path, max_steps=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.are_deterministic_algorithms_enabled() == was


def test_truncate_log_drops_later_and_cut_lines(tmp_path):
    from argen.training.parts import JsonlLog

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    log = JsonlLog(path, start_step=2)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3, "loss": 0.5}\n'
