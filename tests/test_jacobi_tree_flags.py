"""The draft tree (`tree=`, "KxD[xG]") reaches the library from `argen sample`, `argen sample-batch` and
both server schedulers, is recorded in a sample-batch run's identity only when set, and bad spellings
or a tree without Jacobi decoding are one-line errors (exit 2 on the command line)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import argen
from argen.engine.jacobi import jacobi_decode
from argen.sampling import SamplingParams, image_seed
from argen.utils.errors import ArgenError
from test_engine import tiny_gpt


def test_sample_and_sample_batch_take_a_tree(tmp_path, capsys):
    from argen.cli.main import main
    from argen.evaluation.sample_batch import SampleBatchConfig, sample_batch
    from test_jacobi import released_c2i

    tok, flags, gpt = released_c2i(tmp_path)
    rc = main(["sample", *flags, "--classes", "1,2,3", "--top-k", "20", "--seed", "5", "--decode", "jacobi",
               "--window", "4", "--tree", "3x2", "--save-codes", "--out", str(tmp_path / "t")])
    assert rc == 0
    codes = np.load(tmp_path / "t" / "codes.npy")
    gens = [torch.Generator().manual_seed(image_seed(5, i)) for i in range(3)]
    want = argen.generate(gpt, torch.tensor([1, 2, 3]), cfg_scale=4.0, top_k=20, row_generators=gens,
                          decode="jacobi", window=4, tree="3x2")
    assert np.array_equal(codes, want.numpy())
    gens = [torch.Generator().manual_seed(image_seed(5, i)) for i in range(3)]
    no_tree = argen.generate(gpt, torch.tensor([1, 2, 3]), cfg_scale=4.0, top_k=20, row_generators=gens,
                             decode="jacobi", window=4)
    assert not np.array_equal(codes, no_tree.numpy())  # the tree draws more numbers: the flag took effect
    capsys.readouterr()
    for bad, message in ((["--tree", "3x2"], "--tree applies only to --decode jacobi"),
                         (["--decode", "jacobi", "--tree", "3"], "spelled KxD"),
                         (["--decode", "jacobi", "--tree", "1x2"], "candidates >= 2")):
        assert main(["sample", *flags, "--classes", "1", *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err

    tokenizer = argen.load_tokenizer(tok, config="VQ-tiny-16")
    base = dict(num_samples=3, batch_size=2, shard_size=3, sampling=SamplingParams(top_k=20, cfg_scale=2.0), seed=7)
    run = tmp_path / "batch"
    sample_batch(tokenizer, gpt, SampleBatchConfig(**base, decode="jacobi", window=3, tree="2x2"), run,
                 progress=False)
    assert json.loads((run / "config.json").read_text())["config"]["tree"] == "2x2"
    sample_batch(tokenizer, gpt, SampleBatchConfig(**base, decode="jacobi", window=3), tmp_path / "flat",
                 progress=False)
    assert "tree" not in json.loads((tmp_path / "flat" / "config.json").read_text())["config"]
    with pytest.raises(ArgenError, match="another config"):
        sample_batch(tokenizer, gpt, SampleBatchConfig(**base, decode="jacobi", window=3, tree="3x2"), run,
                     progress=False)
    with pytest.raises(ArgenError, match="decode='jacobi' only"):
        SampleBatchConfig(**base, tree="2x2").validate()


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_server_wide_tree(scheduler):
    """Both schedulers serve a request's images as `jacobi_decode` with the same tree and the images'
    own generators, whatever else shares the batch or the slots."""
    from argen.models.tokenizer import VQModel, vq_config
    from argen.serving import GenerationService, JobSpec, ServeConfig

    with pytest.raises(ArgenError, match="decode='jacobi' only"):
        ServeConfig(scheduler=scheduler, tree="4x2")
    with pytest.raises(ArgenError, match="spelled KxD"):
        ServeConfig(scheduler=scheduler, decode="jacobi", tree="four")
    assert ServeConfig(decode="jacobi", tree=" 4x2x3").tree == "4x2x3"
    model = tiny_gpt("c2i")
    torch.manual_seed(0)
    tokenizer = VQModel(vq_config("VQ-tiny-16")).eval()
    service = GenerationService(tokenizer, model, ServeConfig(scheduler=scheduler, decode="jacobi", window=4,
                                                              tree="3x2", max_wait_ms=50, max_batch_size=2))
    service.start()
    try:
        jobs = [service.submit(JobSpec([3, 3, 5], SamplingParams(cfg_scale=2.0, top_k=30), seed=9)),
                service.submit(JobSpec([1], SamplingParams(top_k=30, temperature=1.5), seed=2))]
        served = [job.future.result(timeout=120)["codes"] for job in jobs]
        metrics = service.metrics()
    finally:
        service.close()
    if scheduler == "continuous":
        assert metrics["jacobi_rescued_total"] > 0  # alternatives of the tree won some steps
    gens = [torch.Generator().manual_seed(image_seed(9, i)) for i in range(3)]
    want = jacobi_decode(model, torch.tensor([3, 3, 5]), None, SamplingParams(cfg_scale=2.0, top_k=30), window=4,
                         row_generators=gens, tree="3x2").tokens
    assert np.array_equal(np.array(served[0]), want.numpy())
    gens = [torch.Generator().manual_seed(image_seed(2, 0))]
    want = jacobi_decode(model, torch.tensor([1]), None, SamplingParams(top_k=30, temperature=1.5), window=4,
                         row_generators=gens, tree="3x2").tokens
    assert np.array_equal(np.array(served[1]), want.numpy())
