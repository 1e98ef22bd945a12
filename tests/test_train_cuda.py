"""Generator training's CUDA branches: device selection (checked on the CPU with torch.cuda stubbed) and,
where CUDA exists, a few real steps in bf16 and fp16 with fused AdamW, EMA and an exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from argen.training import distributed as D


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda's device calls stubbed: `count` GPUs, set_device validates its argument as torch does."""
    from torch.cuda._utils import _get_device_index

    chosen = []

    def set_device(device):
        chosen.append(_get_device_index(device))  # raises for torch.device("cuda") without an index

    def install(count: int):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        return chosen

    return install


def test_single_process_on_cuda_without_an_index_selects_the_current_gpu(fake_gpus, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    chosen = fake_gpus(1)
    info = D.init_distributed(torch.device("cuda"))  # what --device auto / cuda give
    assert chosen == [0]
    assert info.device == torch.device("cuda", 0) and not info.distributed
    info = D.init_distributed(torch.device("cuda", 0))
    assert info.device == torch.device("cuda", 0)


def test_torchrun_rank_takes_its_local_gpu_and_nccl(fake_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    chosen = fake_gpus(2)
    groups = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: groups.append(kw))
    info = D.init_distributed(torch.device("cuda"))
    assert chosen == [1] and info.device == torch.device("cuda", 1) and info.rank == 1
    assert groups[0]["backend"] == "nccl" and groups[0]["device_id"] == torch.device("cuda", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_on_cuda(tmp_path, precision):
    """bf16 (the CUDA default) and fp16 with the grad scaler; fused AdamW, EMA, --deterministic; a run
    stopped and resumed on the GPU ends with the uninterrupted run's weights."""
    import json

    from safetensors.torch import load_file

    import argen
    from argen.training.generator import train
    from test_train import make_codes, quick

    codes = make_codes(tmp_path)
    kw = dict(device="cuda", precision=precision, ema=True, deterministic=True)
    whole = train(quick(codes, tmp_path / "whole", max_steps=4, **kw))
    assert math.isfinite(whole["final_loss"])
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["gpu_mem_gb"] > 0 for r in log)
    model = argen.load_gpt(tmp_path / "whole", device="cuda")
    assert model.tok_embeddings.weight.is_cuda
    train(quick(codes, tmp_path / "parts", max_steps=2, **kw))
    train(quick(codes, tmp_path / "parts", max_steps=4, resume=True, **kw))
    a, b = (load_file(str(tmp_path / run / "gpt.safetensors")) for run in ("whole", "parts"))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst  # bitwise expected in deterministic mode; a little room for CUDA kernels
