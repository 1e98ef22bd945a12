"""Text encoders run offline: MiniLM from its PyPI package, and a tiny random T5 saved locally."""

import json

import pytest
import torch

from argen.data import text_encoders
from argen.data.text_encoders import load_text_encoder
from argen.utils.errors import ArgenError


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_per_token_features(minilm):
    assert minilm.dim == 384
    feats = minilm.encode_unpadded(["a red apple", "hi", "a red apple"])
    assert [f.shape[1] for f in feats] == [384] * 3
    assert feats[0].shape[0] == 5 and feats[1].shape[0] == 3  # [CLS] ... [SEP]
    torch.testing.assert_close(feats[0], feats[2])  # batch padding does not leak into results
    alone = minilm.encode_unpadded(["hi"])[0]
    torch.testing.assert_close(alone, feats[1], atol=1e-4, rtol=1e-4)
    padded, mask = minilm.encode(["a red apple", "hi"], length=8)
    assert padded.shape == (2, 8, 384)
    assert mask.sum(1).tolist() == [5, 3] and mask[1, :5].sum() == 0
    torch.testing.assert_close(padded[1, 5:], feats[1])


def _plain_last_hidden_state(folder, text, model_class=None):
    """The encoder's last hidden state for one unpadded text, straight from transformers."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = (model_class or AutoModel).from_pretrained(str(folder), local_files_only=True).eval()
    ids = tokenizer(text, return_tensors="pt")
    inputs = {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        return model(**inputs).last_hidden_state[0].float()


def test_minilm_features_are_the_models_last_hidden_states(minilm):
    feats = minilm.encode_unpadded(["a red apple", "hi"])  # batched with padding
    want = _plain_last_hidden_state(text_encoders.minilm_path(), "a red apple")
    assert feats[0].shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(feats[0], want, atol=1e-4, rtol=1e-4)


def test_minilm_hash_mismatch_fails_clearly(monkeypatch):
    monkeypatch.setattr(text_encoders, "MINILM_SHA256", "0" * 64)
    monkeypatch.setattr(text_encoders, "_VERIFIED", set())
    with pytest.raises(ArgenError, match="sha256"):
        text_encoders.minilm_path()


def _tiny_t5(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "apple", "cat", "on", "the", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = T5Config(vocab_size=len(words), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(config).save_pretrained(folder)


def test_tiny_t5_from_local_folder(tmp_path):
    _tiny_t5(tmp_path / "t5")
    assert json.loads((tmp_path / "t5" / "config.json").read_text())["model_type"] == "t5"
    enc = load_text_encoder(tmp_path / "t5", max_length=4)
    assert enc.dim == 16
    feats = enc.encode_unpadded(["a red apple", "the cat on the mat"])
    assert feats[0].shape == (4, 16)  # three words + </s>
    assert feats[1].shape == (4, 16)  # truncated to max_length
    padded, mask = enc.encode(["a cat"], length=6)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert padded[0, :3].abs().sum() == 0 and padded[0, 3:].abs().sum() > 0
    from transformers import T5EncoderModel

    want = _plain_last_hidden_state(tmp_path / "t5", "a cat", T5EncoderModel)  # "a", "cat", "</s>"
    torch.testing.assert_close(padded[0, 3:], want, atol=1e-5, rtol=1e-5)


def test_unknown_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ArgenError, match="unknown text encoder"):
        load_text_encoder("no-such-encoder")
    with pytest.raises(ArgenError, match="config.json"):
        load_text_encoder(tmp_path)
