"""The demo's shipped classifier: it loads strictly, scores real validation images as recorded, its
training entry point works, and the scores it feeds the report are computed right."""

import json
import math

import numpy as np
import pytest

from argen.checkpoint import load_classifier, save_classifier
from argen.data.datasets import DemoDataset
from argen.evaluation.demo_classifier import (
    DEMO_CLASSIFIER,
    accuracy,
    embed,
    load_demo_classifier,
    nearest_centroid,
    predict,
    train_demo_classifier,
)
from argen.models.classifier import ClassifierConfig
from argen.utils.errors import CheckpointError


def test_shipped_classifier_matches_its_record_on_validation_images():
    model, info = load_demo_classifier()
    val = DemoDataset("val")
    assert info["class_names"] == val.class_names
    acc, per_class = accuracy(predict(model, val.images), val.labels, len(val.class_names))
    assert acc == pytest.approx(info["val_accuracy"], abs=0.005)
    assert acc >= 0.7  # the demo's ceiling: well above the 10% of chance
    assert math.isnan(per_class[2]) and info["val_accuracy_per_class"][2] is None  # no "Component" emoji in val


@pytest.mark.repro
def test_predictions_do_not_depend_on_the_batch():
    model, _ = load_demo_classifier()
    images = DemoDataset("val").images[:40]
    together = embed(model, images)
    alone = np.concatenate([embed(model, images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_training_entry_point_and_round_trip(tmp_path):
    cfg = ClassifierConfig(widths=(4, 8), dropout=0.0)
    model, info = train_demo_classifier(epochs=1, cfg=cfg, train_limit=64, batch_size=32, progress=False)
    assert 0.0 <= info["val_accuracy"] <= 1.0 and len(info["class_names"]) == 10
    save_classifier(model, tmp_path / "c", extra=info)
    again, meta = load_classifier(tmp_path / "c")
    images = DemoDataset("val").images[:8]
    np.testing.assert_array_equal(predict(model, images), predict(again, images))
    assert meta["val_accuracy"] == info["val_accuracy"]


def test_corrupt_classifier_is_one_clear_error(tmp_path):
    bad = tmp_path / "classifier.safetensors"
    bad.write_bytes(DEMO_CLASSIFIER.read_bytes()[:1000])
    bad.with_suffix(".json").write_text(json.dumps({"family": "classifier"}))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_classifier(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing")


def test_accuracy_and_nearest_centroid():
    acc, per_class = accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
    assert acc == 0.75 and per_class[:3] == [1.0, 1.0, 0.5] and math.isnan(per_class[3])
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    rows = np.array([[0.8, 0.2], [0.1, 0.9]])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    np.testing.assert_array_equal(nearest_centroid(rows, ref, np.array([5, 5, 7])), [5, 7])
