"""The trainer's steady speed on a saved network, per batch size, through cnnforge's own input
pipeline and compile (``training_data``, ``compile_model``): what a search's final training runs.

    python benchmarks/trainer_throughput.py RUN/best.keras --batch 128,256,512
    python benchmarks/trainer_throughput.py RUN/best.keras --keras-batch-norm
    TF_ENABLE_ONEDNN_OPTS=0 python benchmarks/trainer_throughput.py RUN/best.keras

Trains a fresh copy of the network (same architecture, new weights) for four epochs on the
first ``--images`` Fashion-MNIST training images (as ``load_dataset`` splits them) with subtle
shifts, flips and label smoothing (the priors' recipe), and prints, for the fastest of epochs
2-4 (the first traces the step): images/s, GFLOP/s (3 x the forward FLOPs per image, as
``trials.csv``'s ``train_gflops``), its share of the fp32 peak ``cnnforge bench`` measures
(an onnxruntime MatMul at as many threads as the process may use, measured in the same run,
before training), and the cores busy (the process's CPU seconds over the epoch's wall seconds).
``--keras-batch-norm`` trains the normalization layers through Keras' own code instead of
TensorFlow's fused kernel. Thread counts and oneDNN come from the environment
(``TF_NUM_INTRAOP_THREADS``, ``TF_NUM_INTEROP_THREADS``, ``TF_ENABLE_ONEDNN_OPTS``).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
EPOCHS = 4


def _epochs(model, data) -> list[tuple[float, float]]:
    """Each epoch's wall seconds and the process's CPU seconds over them."""
    import keras

    marks: list = []

    def begin(epoch, logs):
        marks.append((time.perf_counter(), time.process_time()))

    def end(epoch, logs):
        wall, cpu = marks.pop()
        marks.append((time.perf_counter() - wall, time.process_time() - cpu))

    timer = keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)
    model.fit(data, epochs=EPOCHS, verbose=0, callbacks=[timer])
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a .keras file (a run's best.keras)")
    parser.add_argument("--batch", default="128", help="comma-separated batch sizes")
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--data", default="fashion_mnist:/usr/share/datasets/fashion-mnist")
    parser.add_argument("--keras-batch-norm", action="store_true")
    args = parser.parse_args()

    import keras

    from cnnforge.bench.machine import measure_peak
    from cnnforge.core.cpus import available_cpus
    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.training import Recipe, compile_model, steps_per_epoch, training_data
    from cnnforge.tuning.costs import forward_flops

    peak = measure_peak("cpu", available_cpus())
    dataset = load_dataset(args.data)
    x, y = dataset.x_train[: args.images], dataset.y_train[: args.images]
    saved = keras.models.load_model(args.model)
    flops = forward_flops(saved)
    for batch in (int(b) for b in args.batch.split(",")):
        model = keras.models.clone_model(saved)
        recipe = Recipe(0.003, "cosine", label_smoothing=0.1, augment="subtle", flip=True)
        compile_model(
            model,
            recipe,
            steps=steps_per_epoch(len(x), batch) * EPOCHS,
            fused_batch_norm=not args.keras_batch_norm,
        )
        data = training_data(
            x, y, recipe, num_classes=dataset.spec.num_classes, batch_size=batch, seed=0
        )
        epochs = _epochs(model, data)
        wall, cpu = min(epochs[1:])
        gflops = 3 * flops * len(x) / wall / 1e9
        print(
            json.dumps(
                {
                    "batch": batch,
                    "batch_norm": "keras" if args.keras_batch_norm else "fused",
                    "epoch_s": [round(w, 2) for w, _ in epochs],
                    "images_per_s": round(len(x) / wall),
                    "train_gflops": round(gflops, 1),
                    "peak_gflops": round(peak.gflops, 1),
                    "peak_share": round(gflops / peak.gflops, 3),
                    "cores_busy": round(cpu / wall, 2),
                    "usable_cores": available_cpus(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
