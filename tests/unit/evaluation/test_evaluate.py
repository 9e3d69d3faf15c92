"""Deployed-model accuracy with onnxruntime, and the per-class scores behind it."""

from __future__ import annotations

import numpy as np
import pytest

from cnnforge.core.errors import CnnforgeError
from cnnforge.evaluation.evaluate import class_scores, confusion_matrix, evaluate


def test_confusion_matrix_and_class_scores_on_a_known_table():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    matrix = confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = class_scores(matrix, ("a", "b", "c"))
    assert [s.support for s in scores] == [3, 2, 1]
    assert scores[0].precision == 1.0 and scores[0].recall == pytest.approx(2 / 3)
    assert scores[1].precision == 0.5 and scores[1].recall == 0.5
    assert scores[2].precision == 0.5 and scores[2].recall == 1.0


def test_class_never_predicted_has_zero_precision_not_nan():
    scores = class_scores(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2), ("a", "b"))
    assert scores[1].precision == 0.0 and scores[1].recall == 0.0


def test_evaluate_the_exported_model(finished_run, small_npz):
    result = evaluate(finished_run.run_dir / "model.onnx", str(small_npz))
    assert result.images == 200
    matrix = np.array(result.confusion)
    assert matrix.sum() == 200
    assert result.accuracy == pytest.approx(np.trace(matrix) / 200)
    assert result.accuracy > 0.3  # ten classes: chance is 0.1
    assert result.per_class[0].name == "T-shirt/top"


def test_evaluate_reports_calibration_and_selective_accuracy(finished_run, small_npz):
    from cnnforge.core import calibration
    from cnnforge.evaluation.evaluate import predict_images

    model = finished_run.run_dir / "model.onnx"
    result = evaluate(model, str(small_npz))
    with np.load(small_npz) as data:
        probabilities = predict_images(model, data["x_test"][..., None])
        labels = data["y_test"]
    assert result.ece == pytest.approx(calibration.ece(probabilities, labels))
    assert result.nll == pytest.approx(calibration.nll(probabilities, labels))
    assert result.brier == pytest.approx(calibration.brier(probabilities, labels))
    assert result.selective_accuracy["100%"] == pytest.approx(result.accuracy)
    assert result.selective_accuracy["80%"] == pytest.approx(
        calibration.selective_accuracy(probabilities, labels, 0.8)
    )
    assert list(result.selective_accuracy) == ["100%", "90%", "80%"]


def test_evaluate_reads_data_of_another_size_as_predict_would(finished_run, tmp_path):
    from PIL import Image

    from cnnforge import Classifier
    from cnnforge.evaluation.evaluate import predict_images

    x = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    y = np.arange(10)
    np.savez(tmp_path / "other.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    model = finished_run.run_dir / "model.onnx"
    result = evaluate(model, str(tmp_path / "other.npz"))  # resized and made grayscale
    classifier = Classifier(model)
    predicted = classifier.probabilities([Image.fromarray(image) for image in x]).argmax(axis=1)
    assert result.accuracy == pytest.approx(float(np.mean(predicted == y)))
    with pytest.raises(CnnforgeError, match=r"takes images of shape \(28, 28, 1\)"):
        predict_images(model, x, source="other.npz")


def test_predict_images_feeds_each_model_its_own_layout(tmp_path):
    import tiny_onnx

    from cnnforge.evaluation.evaluate import predict_images

    # the same conv classifier, taking NCHW or NHWC (a Transpose first): the same function
    nchw = tiny_onnx.save(tiny_onnx.conv_classifier(layout="NCHW"), tmp_path / "nchw.onnx")
    nhwc = tiny_onnx.save(tiny_onnx.conv_classifier(layout="NHWC"), tmp_path / "nhwc.onnx")
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
    from_nhwc = predict_images(nhwc, images, batch_size=2)
    assert from_nhwc.shape == (5, 4)
    np.testing.assert_allclose(predict_images(nchw, images, batch_size=2), from_nhwc, atol=1e-5)
    with pytest.raises(CnnforgeError, match=r"takes images of shape \(3, 16, 16\) \(NCHW\)"):
        predict_images(nchw, images[..., :1])


def photo_folder(root, size: tuple[int, int] = (24, 20), classes: int = 4):
    """train/ and test/ folders of random RGB photos of (W, H) ``size``, classes c0, c1, …"""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, count in (("train", 3), ("test", 3)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_model_without_recorded_preprocessing_is_evaluated_as_predict_reads_it(layout, tmp_path):
    """A model exported by another tool (no ``cnnforge.preprocessing``) on photos of another
    size: evaluate stretches them to its input as Classifier does, and scores what it says."""
    import tiny_onnx

    from cnnforge import Classifier
    from cnnforge.core.errors import CnnforgeWarning

    model = tiny_onnx.save(tiny_onnx.conv_classifier(layout=layout), tmp_path / "bare.onnx")
    root = photo_folder(tmp_path / "photos")
    result = evaluate(model, str(root))
    with pytest.warns(CnnforgeWarning, match="no cnnforge metadata"):
        classifier = Classifier(model)
    files = sorted((root / "test").glob("*/*.png"))
    truth = np.array([int(f.parent.name[1:]) for f in files])
    predicted = classifier.probabilities(files).argmax(axis=1)
    assert result.images == len(files) == 12
    assert result.confusion == confusion_matrix(truth, predicted, 4).tolist()
