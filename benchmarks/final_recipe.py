"""A default run's winner trained again outside the search, recipe by recipe: what its final
training could reach, and what holding out the calibration slice costs it.

    python benchmarks/final_recipe.py RUN --epochs 54 --augment light,medium --seeds 0,1
    python benchmarks/final_recipe.py RUN --epochs 54 --without-slice
    python benchmarks/final_recipe.py RUN --augment subtle --label-smoothing 0.1 --flip

``RUN`` is a ``cnnforge run`` directory on the bundled data (``fashion_mnist_small``): its
``best.keras`` gives the network (trained afresh: same architecture, new weights), its
``heldout.npz`` the calibration slice that ``--without-slice`` leaves out, as the run's own
final training does. Each recipe is the run's (Adam, cosine, learning rate 3e-3, batch 128) with
the augmentation asked for, trained on train+validation through cnnforge's own pipeline and
compile; test accuracy by Keras on the full Fashion-MNIST test split (10,000 images, Debian's
``dataset-fashion-mnist``). One line of JSON a recipe. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FASHION_MNIST = "fashion_mnist:/usr/share/datasets/fashion-mnist"
BATCH = 128


def training_images(run: Path, without_slice: bool):
    """Train+validation of the bundled data, less the run's calibration slice if asked."""
    import numpy as np

    from cnnforge.data.dataset import load_dataset

    dataset = load_dataset("fashion_mnist_small")
    x = np.concatenate([dataset.x_train, dataset.x_val])
    y = np.concatenate([dataset.y_train, dataset.y_val])
    if without_slice:
        held = np.load(run / "heldout.npz")["indices"]
        kept = np.setdiff1d(np.arange(len(y)), held)
        x, y = x[kept], y[kept]
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--epochs", type=int, default=54)
    parser.add_argument("--augment", default="light", help="comma-separated: none,light,...")
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--without-slice", action="store_true")
    args = parser.parse_args()

    import keras

    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.training import Recipe, compile_model, steps_per_epoch, training_data

    x, y = training_images(args.run, args.without_slice)
    test = load_dataset(FASHION_MNIST)
    x_test, y_test = test.x_test.astype("float32"), test.y_test
    saved = keras.models.load_model(args.run / "best.keras")
    for augment in args.augment.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            keras.utils.set_random_seed(seed)
            model = keras.models.clone_model(saved)
            recipe = Recipe(
                learning_rate=args.learning_rate,
                lr_schedule="cosine",
                augment=augment,
                label_smoothing=args.label_smoothing,
                flip=args.flip,
            )
            compile_model(model, recipe, steps=steps_per_epoch(len(x), BATCH) * args.epochs)
            data = training_data(x, y, recipe, num_classes=10, batch_size=BATCH, seed=seed)
            start = time.perf_counter()
            model.fit(data, epochs=args.epochs, verbose=0)
            seconds = time.perf_counter() - start
            predicted = model.predict(x_test, batch_size=512, verbose=0).argmax(1)
            print(
                json.dumps(
                    {
                        "augment": augment,
                        "label_smoothing": args.label_smoothing,
                        "flip": args.flip,
                        "seed": seed,
                        "epochs": args.epochs,
                        "images": len(y),
                        "test_accuracy": float((predicted == y_test).mean()),
                        "seconds": round(seconds, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
