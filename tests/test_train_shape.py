"""Size x shape, tokenizer ablation flags, --init-from, recipes, --dry-run and the dataclass-derived flags."""

import json

import pytest
import torch

import argen
from argen.checkpoint import save_tokenizer
from argen.cli import flags
from argen.cli.main import main
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQ_CONFIGS, VQModel, vq_config, with_downsample
from argen.training.config import TokenizerTrainConfig, TrainConfig
from argen.training.plan import estimate_memory
from argen.training.recipes import load_recipe, recipe_names
from argen.utils.errors import ArgenError
from conftest import save_released
from test_train import make_codes

FAST_TOKENIZER = ["--data", "demo", "--config", "VQ-tiny", "--image-size", "16", "--batch-size", "2",
                  "--vgg-weights", "none", "--no-disc", "--no-progress", "--log-every", "1"]


def _demo_shaped_codes(root):
    """Codes shaped like `argen demo`'s: a 512-entry codebook, 8x8 grid at 64 px (downsample 8), 10 classes."""
    codes = make_codes(root, grid=8, codebook=512)
    index = json.loads((codes / "index.json").read_text())
    index.update(image_size=64, tokenizer=vq_config("VQ-demo").to_dict())
    (codes / "index.json").write_text(json.dumps(index))
    return codes


def test_gpt_mini_trains_on_demo_codes_and_samples_without_flags(tmp_path):
    codes = _demo_shaped_codes(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--codes", str(codes), "--config", "GPT-mini", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--no-progress", "--no-tensorboard"]) == 0
    cfg = argen.load_gpt(out).config
    arch = gpt_config("GPT-mini")
    assert (cfg.n_layer, cfg.dim, cfg.n_head) == (arch.n_layer, arch.dim, arch.n_head)
    assert arch.vocab_size == 1024  # the named config's own default differs: the codes decided
    assert (cfg.vocab_size, cfg.image_size, cfg.downsample, cfg.grid_size, cfg.num_classes) == (512, 64, 8, 8, 10)
    tok = tmp_path / "tok"
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-demo")), tok)
    samples = tmp_path / "samples"
    assert main(["sample", "--tokenizer", str(tok), "--gpt", str(out), "--classes", "1,2", "--out", str(samples),
                 "--device", "cpu", "--save-codes", "--no-progress"]) == 0
    assert len(list(samples.glob("*.png"))) >= 2


def test_t2i_shape_comes_from_the_caption_features(tmp_path):
    codes = make_codes(tmp_path, kind="t2i", caption_dim=16, num_captions=6)  # GPT-tiny's own default is 32 wide
    out = tmp_path / "run"
    assert main(["train", "--codes", str(codes), "--config", "GPT-tiny", "--out", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--no-progress", "--no-tensorboard"]) == 0
    cfg = argen.load_gpt(out).config
    assert (cfg.kind, cfg.caption_dim, cfg.caption_len) == ("t2i", 16, 6)  # longest caption: 3 + 5 % 4 = 6 tokens
    assert main(["train", "--codes", str(codes), "--config", "GPT-tiny", "--out", str(tmp_path / "x"),
                 "--max-steps", "1", "--kind", "c2i"]) == 2


@pytest.mark.slow
def test_gpt_b_one_step_on_codes_of_a_4096_code_downsample_8_tokenizer(tmp_path):
    from argen.data.codes import CodeShardWriter

    torch.manual_seed(0)
    vq = with_downsample(vq_config("VQ-tiny", codebook_size=4096), 8)
    tokenizer = VQModel(vq).eval()
    batch = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (6, 3, 32, 32)
    with torch.no_grad():
        codes = tokenizer.encode(batch)  # (6, 4, 4)
    writer = CodeShardWriter(tmp_path / "codes", {"kind": "c2i", "codebook_size": 4096, "grid": [4, 4],
                                                  "image_size": 32, "num_classes": 10, "tokenizer": vq.to_dict()})
    writer.write_shard(0, codes[:, None], torch.arange(6) % 10)
    writer.finalize()
    out = tmp_path / "gpt-b"
    assert main(["train", "--codes", str(tmp_path / "codes"), "--config", "GPT-B", "--out", str(out),
                 "--max-steps", "1", "--batch-size", "2", "--no-progress", "--no-tensorboard"]) == 0
    cfg = argen.load_gpt(out).config
    assert (cfg.n_layer, cfg.dim) == (12, 768)
    assert (cfg.vocab_size, cfg.downsample, cfg.grid_size, cfg.image_size, cfg.num_classes) == (4096, 8, 4, 32, 10)


def test_tokenizer_ablation_flags_are_recorded(tmp_path):
    out = tmp_path / "vq"
    assert main(["train-tokenizer", *FAST_TOKENIZER, "--out", str(out), "--max-steps", "2",
                 "--codebook-dim", "32", "--codebook-size", "4096", "--no-codebook-l2-norm", "--downsample", "4"]) == 0
    tok = argen.load_tokenizer(out)
    cfg = tok.config
    assert (cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm, cfg.downsample) == (4096, 32, False, 4)
    assert tok.quantize.embedding.weight.shape == (4096, 32)
    assert tok.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4)
    assert "codebook_size=4096" in cfg.name


def test_with_downsample_maps_the_released_configs():
    assert with_downsample(VQ_CONFIGS["VQ-16"], 8) == VQ_CONFIGS["VQ-8"]
    assert with_downsample(VQ_CONFIGS["VQ-8"], 16) == VQ_CONFIGS["VQ-16"]
    with pytest.raises(ArgenError, match="power of two"):
        with_downsample(VQ_CONFIGS["VQ-16"], 12)


def _find_tensor(obj, target):
    if isinstance(obj, torch.Tensor):
        return obj.shape == target.shape and torch.allclose(obj.float(), target.float(), atol=1e-5)
    if isinstance(obj, dict):
        return any(_find_tensor(v, target) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_find_tensor(v, target) for v in obj)
    return False


def test_init_from_released_tokenizer_with_its_discriminator(tmp_path):
    from argen.models.discriminator import PatchGANDiscriminator
    from argen.utils.torch_utils import load_torch_file

    torch.manual_seed(5)
    vq = VQModel(vq_config("VQ-tiny"))
    disc = PatchGANDiscriminator(3, 64, 2)  # the depth argen picks for 16 px images
    for p in disc.parameters():
        p.data.normal_()
    released = tmp_path / "vq_released.pt"
    save_released(vq, released)
    blob = {"model": vq.state_dict(), "discriminator": disc.state_dict(), "steps": 10}
    torch.save(blob, released)
    args = [a for a in FAST_TOKENIZER if a != "--no-disc"]
    out = tmp_path / "ft"
    assert main(["train-tokenizer", *args, "--out", str(out), "--max-steps", "1", "--lr", "1e-9", "--disc-start", "0",
                 "--init-from", str(released), "--ckpt-every", "1"]) == 0
    tuned = argen.load_tokenizer(out)
    start, fresh = vq.state_dict(), VQModel(vq_config("VQ-tiny")).state_dict()
    key = "quantize.embedding.weight"
    assert torch.allclose(tuned.state_dict()[key], start[key], atol=1e-5)
    assert not torch.allclose(tuned.state_dict()[key], fresh[key], atol=1e-3)
    state = load_torch_file(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip())
    assert _find_tensor(state, disc.state_dict()["main.0.weight"])
    # a fine-tune keeps the file's shape; an argen tokenizer brings its own config
    assert main(["train-tokenizer", *FAST_TOKENIZER, "--out", str(tmp_path / "bad"), "--max-steps", "1",
                 "--init-from", str(released), "--codebook-size", "1024"]) == 2
    again = tmp_path / "ft2"
    assert main(["train-tokenizer", *FAST_TOKENIZER, "--config", "VQ-16", "--out", str(again), "--max-steps", "1",
                 "--lr", "1e-9", "--init-from", str(out)]) == 0
    assert argen.load_tokenizer(again).config == tuned.config


def test_every_recipe_cites_every_value():
    names = recipe_names()
    for expected in ("c2i_B_256", "c2i_B_384", "c2i_L_256", "c2i_L_384", "c2i_XL_384", "c2i_XXL_384", "c2i_3B_384",
                     "t2i_XL_stage1_256", "t2i_XL_stage2_512", "vq_ds16_c2i", "vq_ds8_c2i", "vq_ds16_t2i"):
        assert expected in names
    for name in names:
        recipe = load_recipe(name)
        cls = TrainConfig if recipe["trainer"] == "train" else TokenizerTrainConfig
        fields = {f.name for f in flags.flag_fields(cls)}
        assert set(recipe["settings"]) <= fields, name
        cited = set(recipe["sources"])
        assert set(recipe["settings"]) <= cited, (name, set(recipe["settings"]) - cited)
        shape_free = {k for k in recipe["data"] if k not in ("num_images", "epochs", "tokenizer", "extract_codes")}
        assert {f"data.{k}" for k in shape_free} <= cited, name
    big = [n for n in names if load_recipe(n)["settings"].get("config") in ("GPT-XXL", "GPT-3B")]
    assert big and all(load_recipe(n)["settings"]["strategy"] == "fsdp" for n in big)
    with pytest.raises(ArgenError, match="argen train-tokenizer"):
        load_recipe("vq_ds16_c2i", "train")


def test_dry_run_prints_the_papers_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--recipe", "c2i_XL_384", "--dry-run"]) == 0
    text = capsys.readouterr().out
    for needle in ('config         "GPT-XL"', "batch_size     256", "lr             0.0002", "weight_decay   0.05",
                   "betas          [0.9, 0.95]", "grad_clip      1.0", "dropout        0.1", "class_dropout  0.1",
                   'precision      "bf16"', "max_steps      1501200", "data.ten_crop: true", "image_size=384",
                   "vocab_size=16384", "num_classes=1000", "epochs: 300.0", "issue #8", "estimated GPU memory"):
        assert needle in text, needle
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    assert main(["train", "--recipe", "c2i_XL_384", "--dry-run", "--batch-size", "512", "--world-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "batch_size     512  <- command line" in text and "64 samples per rank" in text
    assert "epochs: 599.9" in text  # the recipe's step count stays; twice the batch sees twice the epochs
    assert main(["train", "--recipe", "t2i_XL_stage1_256", "--dry-run"]) == 0
    assert "not published" in capsys.readouterr().out
    assert main(["train", "--recipe", "t2i_XL_stage1_256", "--codes", "c", "--out", "o"]) == 2  # no step count
    assert main(["train-tokenizer", "--recipe", "vq_ds16_c2i", "--dry-run", "--codebook-size", "4096"]) == 0
    text = capsys.readouterr().out
    assert "codebook 4096 x 8" in text and "optimizer steps: 400K" in text


def test_dry_run_on_codes_uses_their_shape(tmp_path, capsys):
    codes = _demo_shaped_codes(tmp_path)
    assert main(["train", "--codes", str(codes), "--config", "GPT-B", "--dry-run", "--max-steps", "10",
                 "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "vocab_size=512, image_size=64, downsample=8, num_classes=10" in text
    assert "image tokens seen: 5.12K (5,120)" in text


def test_memory_estimate_components():
    cfg = gpt_config("GPT-B")
    one = estimate_memory(cfg, 1, 1, "bf16", ema=False)
    with torch.device("meta"):
        assert one["parameters"] == sum(p.numel() for p in GPT(cfg).parameters())
    two = estimate_memory(cfg, 2, 1, "bf16", ema=False)
    act = [k for k in one["parts"] if k.startswith("activations")]
    assert two["total"] - one["total"] == pytest.approx(one["parts"][act[0]])
    sharded = estimate_memory(cfg, 1, 4, "bf16", ema=True)
    assert sharded["parts"]["AdamW moments (fp32)"] == one["parts"]["AdamW moments (fp32)"] / 4
    assert sharded["parts"]["EMA (fp32)"] > 0 and one["parts"]["EMA (fp32)"] == 0
    assert estimate_memory(cfg, 1, 1, "fp32", ema=False)["parts"][act[0]] > one["parts"][act[0]]


def test_activation_estimate_matches_what_autograd_saves():
    from dataclasses import replace

    from argen.training.plan import estimate_memory

    cfg = replace(gpt_config("GPT-mini"), image_size=128)  # 16x16 grid, 1024 codes
    torch.manual_seed(0)
    model = GPT(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(1024, (2, 256)), torch.randint(10, (2,)))  # fp32: no autocast copies
    parts = estimate_memory(cfg, 2, 1, "fp32", ema=False)["parts"]
    estimate = sum(v for k, v in parts.items() if k.startswith("activations"))
    assert 0.8 < sum(seen.values()) / estimate < 1.25


@pytest.mark.parametrize("command", ["train", "train-tokenizer"])
@pytest.mark.parametrize("bad", [["--ckpt-every", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--batch-size", "0"]])
def test_bad_numbers_exit_2_with_one_line(command, bad, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        data = ["--codes", "c"] if command == "train" else ["--data", "demo"]
        main([command, "--out", str(tmp_path / "o"), *data, "--max-steps", "1", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"argen {command}: error: argument {bad[0]}") and "Traceback" not in "".join(err)
    assert not (tmp_path / "o").exists()


def test_flags_come_from_the_dataclass_and_resolve_in_order(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in flags.flag_fields(TrainConfig):
        assert flags.flag_name(f) in text
    values = {"lr": 3.0}
    cfg = flags.resolve(TrainConfig, values, {"lr": 2.0, "batch_size": 64, "betas": [0.8, 0.9]})
    assert (cfg.lr, cfg.batch_size, cfg.betas, cfg.weight_decay) == (3.0, 64, (0.8, 0.9), 0.05)
    from argen.cli.main import build_parser

    args = build_parser().parse_args(["train-tokenizer", "--out", "o", "--beta2", "0.99", "--no-disc"])
    assert flags.given(args, TokenizerTrainConfig) == {"out": "o", "betas": (0.9, 0.99), "use_disc": False}
    args = build_parser().parse_args(["train", "--betas", "0.5", "0.6"])
    assert flags.given(args, TrainConfig) == {"betas": (0.5, 0.6)}
