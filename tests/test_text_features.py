"""Caption feature storage and left padding."""

import numpy as np
import pytest
import torch

from argen.data.text_features import TextFeatureStore, left_pad, save_text_features
from argen.utils.errors import ArgenError


def _captions(seed=0, dim=6, lengths=(3, 1, 5, 0)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


def test_left_pad_places_tokens_at_the_right_end():
    caps = _captions()
    feats, mask = left_pad(caps, 4)
    assert feats.shape == (4, 4, 6) and mask.shape == (4, 4)
    assert feats.dtype == torch.float32 and mask.dtype == torch.float32
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]
    torch.testing.assert_close(feats[0, 1:], caps[0])
    assert feats[0, 0].abs().sum() == 0
    torch.testing.assert_close(feats[2], caps[2][:4])  # truncated to the first tokens
    assert feats[3].abs().sum() == 0


def test_left_pad_accepts_numpy_and_rejects_mixed_widths():
    feats, mask = left_pad([np.ones((2, 3), np.float16)], 3)
    assert feats[0, 0].sum() == 0 and feats[0, 1:].sum() == 6 and mask.sum() == 2
    with pytest.raises(ArgenError):
        left_pad([np.ones((2, 3)), np.ones((2, 4))], 3)
    with pytest.raises(ArgenError):
        left_pad([np.ones((2, 3))], 0)


def test_store_round_trip_fp16(tmp_path):
    caps = _captions(lengths=(3, 1, 5, 0, 2))
    save_text_features(tmp_path / "f", caps, encoder="test", max_length=8, ids=[10, 11, 12, 13, 14],
                       texts=list("abcde"))
    store = TextFeatureStore(tmp_path / "f")
    assert len(store) == 5 and store.dim == 6
    assert store.lengths.tolist() == [3, 1, 5, 0, 2]
    assert store.ids == [10, 11, 12, 13, 14]
    assert np.load(tmp_path / "f" / "features.npy", mmap_mode="r").dtype == np.float16
    feats, mask = store.get([2, 0], 4)
    ref, ref_mask = left_pad([caps[2].half().float(), caps[0].half().float()], 4)
    torch.testing.assert_close(feats, ref)
    torch.testing.assert_close(mask, ref_mask)
    assert (store.unpadded(1) - caps[1]).abs().max() < 1e-2
    with pytest.raises(IndexError):
        store.unpadded(5)


def test_store_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ArgenError, match="extract-text-features"):
        TextFeatureStore(tmp_path)
