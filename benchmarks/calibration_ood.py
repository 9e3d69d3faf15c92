"""Calibration and "not one of the classes" on real data, small: a cnnforge search on the
bundled Fashion-MNIST subset (8000 train, 2000 test images), its model exported with and
without the temperature, then onnxruntime on the 2000 test images (ECE, NLL, Brier, selective
accuracy, before and after) and on images that are no clothing: scikit-learn's real 8x8 digits
stretched to 28x28, and uniform noise (AUROC of the max-probability score, share rejected at the
threshold that accepts 95 % of held-out Fashion-MNIST images; energy from the Keras logits).

    python benchmarks/calibration_ood.py RUN_DIR [--epochs 4] [--trials 2]
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


def keras_logits(model, images: np.ndarray) -> np.ndarray:
    """The last Dense layer's pre-softmax values (for the energy score)."""
    import keras

    last = model.layers[-1]
    features = keras.Model(model.inputs, last.input)
    x = np.concatenate(
        [features(images[i : i + 256], training=False) for i in range(0, len(images), 256)]
    )
    return x @ last.kernel.numpy() + last.bias.numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()

    from cnnforge.conversion.export import export
    from cnnforge.core import calibration as cal
    from cnnforge.data.dataset import load_dataset
    from cnnforge.deploy.runtime import open_session, predict
    from cnnforge.modeling.keras_io import load_keras_model
    from cnnforge.tuning.search import SearchConfig, search

    if not (args.run_dir / "best.keras").is_file():
        config = SearchConfig(
            data="fashion_mnist_small",
            run_dir=args.run_dir,
            tuner="random",
            max_trials=args.trials,
            epochs=args.epochs,
            patience=0,
        )
        search(config)
    plain = export(args.run_dir, args.run_dir / "plain.onnx")
    scaled = export(args.run_dir, args.run_dir / "calibrated.onnx", calibrate=True)
    dataset = load_dataset("fashion_mnist_small")
    x_test, y_test = dataset.x_test.astype(np.float32), dataset.y_test
    out: dict = {"fitted": scaled.calibration}
    results = {}
    for name, path in (("before", plain.onnx_path), ("after", scaled.onnx_path)):
        p = predict(open_session(path), x_test, 256)
        results[name] = {
            "accuracy": float((p.argmax(1) == y_test).mean()),
            "ece": cal.ece(p, y_test),
            "nll": cal.nll(p, y_test),
            "brier": cal.brier(p, y_test),
            **{f"sel{c}": cal.selective_accuracy(p, y_test, c) for c in (1.0, 0.9, 0.8)},
        }
    out["test"] = results
    before = predict(open_session(plain.onnx_path), x_test, 256)
    # the temperature the test split itself would choose: how well the held-out one transfers
    out["temperature_fitted_on_test"] = cal.fit_temperature(cal.log_probabilities(before), y_test)
    session = open_session(scaled.onnx_path)
    threshold = scaled.calibration["unknown_threshold"]["threshold"]
    in_msp = cal.max_probability(predict(session, x_test, 256))
    rng = np.random.default_rng(0)
    model = load_keras_model(args.run_dir / "best.keras")
    ood = {
        "digits": digits_28(),
        "noise": rng.uniform(0, 255, (2000, 28, 28, 1)).astype(np.float32),
    }
    in_energy = cal.energy_score(keras_logits(model, x_test))
    out["in_distribution_accepted"] = float((in_msp >= threshold).mean())
    for name, images in ood.items():
        msp = cal.max_probability(predict(session, images, 256))
        energy = cal.energy_score(keras_logits(model, images))
        out[name] = {
            "images": len(images),
            "auroc_max_probability": cal.auroc(in_msp, msp),
            "auroc_energy": cal.auroc(in_energy, energy),
            "rejected_at_threshold": float((msp < threshold).mean()),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
