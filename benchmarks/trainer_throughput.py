"""The trainer's steady speed on a saved network, per batch size, through cnnforge's own input
pipeline and compile (``training_data``, ``compile_model``): what a search's final training runs.

    python benchmarks/trainer_throughput.py RUN/best.keras --batch 128,256,512
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/trainer_throughput.py RUN/best.keras

Trains a fresh copy of the network (same architecture, new weights) for three epochs on the
first ``--images`` Fashion-MNIST training images (as ``load_dataset`` splits them) with light shifts, and prints images/s of the
fastest of epochs 2 and 3 (the first traces the step). Thread counts and oneDNN come from the
environment (``TF_NUM_INTRAOP_THREADS``, ``TF_NUM_INTEROP_THREADS``, ``TF_ENABLE_ONEDNN_OPTS``).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
EPOCHS = 3


def _epoch_seconds(model, data) -> list[float]:
    """Each epoch's seconds of ``model.fit`` on ``data``, ``EPOCHS`` of them."""
    import keras

    seconds: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seconds.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: seconds.append(time.perf_counter() - seconds.pop()),
    )
    model.fit(data, epochs=EPOCHS, verbose=0, callbacks=[timer])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a .keras file (a run's best.keras)")
    parser.add_argument("--batch", default="128", help="comma-separated batch sizes")
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--data", default="fashion_mnist:/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()

    import keras

    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.training import Recipe, compile_model, steps_per_epoch, training_data

    dataset = load_dataset(args.data)
    x, y = dataset.x_train[: args.images], dataset.y_train[: args.images]
    saved = keras.models.load_model(args.model)
    for batch in (int(b) for b in args.batch.split(",")):
        model = keras.models.clone_model(saved)
        recipe = Recipe(learning_rate=0.002, lr_schedule="cosine", augment="light")
        compile_model(model, recipe, steps=steps_per_epoch(len(x), batch) * EPOCHS)
        data = training_data(x, y, recipe, num_classes=10, batch_size=batch, seed=0)
        seconds = _epoch_seconds(model, data)
        steady = min(seconds[1:])
        print(
            json.dumps(
                {
                    "batch": batch,
                    "epoch_s": [round(s, 2) for s in seconds],
                    "images_per_s": round(len(x) / steady),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
