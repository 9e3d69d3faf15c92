"""Calibration and "not one of the classes" of a finished, calibrated run, on real data:
onnxruntime on the exported model over a test split (accuracy, ECE, NLL, Brier, selective
accuracy; before calibration, the temperature undone, and after), the temperature the test split
itself would choose (a diagnosis of how well the held-out one transfers, never used by the
product), and images that are no clothing: scikit-learn's real 8x8 digits stretched to 28x28,
and uniform noise. For each, the AUROC against the test split of the graph's ``ood_score`` and,
for comparison, of the maximum probability, the energy (logsumexp of the Keras model's logits)
and a Mahalanobis distance of its penultimate features (class means and a shared covariance
fitted on the training images it trained on; Lee et al., NeurIPS 2018); and the share rejected
at the recorded threshold.

    python benchmarks/calibration_ood.py RUN_DIR [--data fashion_mnist:/usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def digits_28() -> np.ndarray:
    """scikit-learn's 1797 real 8x8 digits (0-16) as 28x28 uint8 images, bilinear."""
    from PIL import Image
    from sklearn.datasets import load_digits

    small = (load_digits().images * (255 / 16)).astype(np.uint8)
    big = [np.asarray(Image.fromarray(d).resize((28, 28), Image.BILINEAR)) for d in small]
    return np.stack(big)[..., None].astype(np.float32)


def feature_extractor(model):
    """A function of images giving the final Dense layer's input (penultimate features),
    float64; one traced graph for every call."""
    import keras
    import tensorflow as tf

    features = keras.Model(model.inputs, model.layers[-1].input)
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    forward = tf.function(lambda x: features(x, training=False), input_signature=[spec])

    def extract(images: np.ndarray) -> np.ndarray:
        parts = [
            forward(images[i : i + 512].astype(np.float32)) for i in range(0, len(images), 512)
        ]
        return np.concatenate(parts).astype(np.float64)

    return extract


def mahalanobis(train: np.ndarray, labels: np.ndarray, floor: float = 1e-3):
    """A scorer: minus the squared Mahalanobis distance to the nearest class mean, with the
    covariance shared by the classes (eigenvalues floored at ``floor`` times their mean)."""
    means = np.stack([train[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    centred = train - means[labels]
    values, vectors = np.linalg.eigh(centred.T @ centred / len(train))
    factor = vectors / np.sqrt(np.maximum(values, floor * values.mean()))
    m = means @ factor

    def score(features: np.ndarray) -> np.ndarray:
        z = features @ factor
        squared = (z**2).sum(1, keepdims=True) - 2 * z @ m.T + (m**2).sum(1)
        return -squared.min(axis=1)

    return score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", default="fashion_mnist:/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()

    from cnnforge.core import calibration as cal
    from cnnforge.core.rundir import RunDir
    from cnnforge.data.dataset import load_dataset
    from cnnforge.deploy.runtime import metadata, open_session, predict_outputs
    from cnnforge.modeling.keras_io import load_keras_model
    from cnnforge.tuning.config import SearchConfig

    run = RunDir(args.run_dir)
    session = open_session(run.onnx)
    meta = metadata(session)
    temperature = meta["probability_calibration"]["temperature"]
    smoothing = meta["probability_calibration"].get("label_smoothing", 0.0)
    unknown = meta["unknown_threshold"]
    names = [o.name for o in session.get_outputs()]
    test = load_dataset(args.data)
    x_test, y_test = test.x_test.astype(np.float32), test.y_test

    def outputs(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, predict_outputs(session, images, names), strict=True))

    in_out = outputs(x_test)
    after = in_out["probabilities"]
    views = {"before": cal.uncalibrated(after, temperature, smoothing), "after": after}
    result: dict = {"model": str(run.onnx), "test_images": len(y_test), "fitted": meta}
    for name, p in views.items():
        result[name] = {
            "accuracy": float((p.argmax(1) == y_test).mean()),
            "ece": cal.ece(p, y_test),
            "nll": cal.nll(p, y_test),
            "brier": cal.brier(p, y_test),
            **{f"selective_{c}": cal.selective_accuracy(p, y_test, c) for c in (1.0, 0.9, 0.8)},
        }
    before_logp = cal.unsmoothed_log_probabilities(views["before"], smoothing)
    result["temperature_the_test_split_would_choose"] = cal.fit_temperature(before_logp, y_test)

    model = load_keras_model(run.best_model)
    keras_features = feature_extractor(model)
    config = SearchConfig.from_json(run.read_config()["search"], run_dir=run.path)
    own = config.load_data()
    x_all = np.concatenate([own.x_train, own.x_val])
    y_all = np.concatenate([own.y_train, own.y_val])
    with np.load(run.heldout) as saved:
        trained = np.setdiff1d(np.arange(len(y_all)), saved["indices"])
    maha = mahalanobis(keras_features(x_all[trained]), y_all[trained])
    last = model.layers[-1]
    kernel, bias = last.kernel.numpy(), last.bias.numpy()

    def scores(images: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = keras_features(images)
        return {
            "ood_score": out.get("ood_score"),
            "max_probability": cal.max_probability(out["probabilities"]),
            "energy": cal.energy_score(features @ kernel + bias),
            "mahalanobis": maha(features),
        }

    in_scores = scores(x_test, in_out)
    used = "max_probability" if unknown["output"] == "probabilities" else "ood_score"
    accepted = in_scores[used] >= unknown["threshold"]
    result["test_accepted_at_threshold"] = float(accepted.mean())
    ood = {
        "digits": digits_28(),
        "noise": np.random.default_rng(0).uniform(0, 255, (2000, 28, 28, 1)).astype(np.float32),
    }
    for name, images in ood.items():
        out = outputs(images)
        theirs = scores(images, out)
        rows = {k: cal.auroc(in_scores[k], v) for k, v in theirs.items() if v is not None}
        rows["rejected_at_threshold"] = float((theirs[used] < unknown["threshold"]).mean())
        result[name] = {"images": len(images), "auroc": rows}
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
