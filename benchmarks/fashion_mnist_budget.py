"""Search quality and training throughput on the full Fashion-MNIST, in one run.

1. seed: the seed's network (simple_cnn's defaults) trained the seed's way: numpy arrays,
   ``model.fit``, 10 epochs, batch 32, on all 60,000 training images; Keras test accuracy.
2. pipeline: the same network, hyperparameters and epochs through cnnforge's trainer
   (``PluginHyperModel.fit``: tf.data, the default recipe, which is the seed's); images/s as a
   ratio against (1), measured in this process right after it.
   Then XLA: the same network through the same pipeline, one epoch of 12,800 images at batch
   128 with and without ``jit_compile`` (after an untimed epoch that compiles), as a ratio.
3. search: the documented budgeted command, run as a user runs it (a subprocess); its wall time
   and the onnxruntime test accuracy of the model it exports (evaluation.json).

    python benchmarks/fashion_mnist_budget.py --out /tmp/fmnist-budget
    python benchmarks/fashion_mnist_budget.py --skip-search ...   # (1) and (2) only

Compare speeds only within one run: these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FASHION_MNIST = "fashion_mnist:/usr/share/datasets/fashion-mnist"
# The command docs/training.md and the README document: Hyperband over the recipe and the head
# of a 3-block batch-normalised simple_cnn, trials on 10% of the images, then the winner trained
# again on all 60,000 for the epochs it took to its best or as many as fit, 30 minutes in all.
BUDGET_COMMAND = (
    "cnnforge run --data {data} --run-dir {run_dir} --tuner hyperband --epochs 20 "
    "--batch-size 128 --search-fraction 0.1 --time-budget 30m --seed 0 --patience 0 "
    "--fix batch_norm=true --fix lr_schedule=cosine --fix conv_blocks=3 --fix kernel_size=3 "
    "--fix first_block_padding=same "
    "--fix pooling=max --fix head=flatten --fix pool_after_last_block=false --fix dense_layers=1 "
    "--fix filters_0=32 --fix filters_1=64 --fix flip=true --fix augment=none "
    "--space filters_2=64,128 --space dense_units_0=128,256 "
    "--space learning_rate=0.001,0.002,0.003,0.005"
)
SEED_EPOCHS, SEED_BATCH = 10, 32


def _seed_network(spec):
    import keras_tuner

    import cnnforge
    from cnnforge.modeling.hypermodel import build_model

    return build_model(
        cnnforge.get("architecture", "simple_cnn"), spec, keras_tuner.HyperParameters()
    )


def seed_way(dataset) -> dict:
    """(1): numpy in, integer labels, sparse cross-entropy, Adam 1e-3: the seed's script."""
    import keras

    model = _seed_network(dataset.spec)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x, y = _all_training(dataset)
    start = time.perf_counter()
    model.fit(x.astype("float32"), y, epochs=SEED_EPOCHS, batch_size=SEED_BATCH, verbose=0)
    seconds = time.perf_counter() - start
    probabilities = model.predict(dataset.x_test.astype("float32"), batch_size=512, verbose=0)
    accuracy = float(np.mean(probabilities.argmax(1) == dataset.y_test))
    return _figures(seconds, len(x), accuracy)


def pipeline_way(dataset) -> dict:
    """(2): the same network, defaults and epochs, trained by cnnforge's trainer."""
    import keras_tuner

    import cnnforge
    from cnnforge.modeling.hypermodel import PluginHyperModel

    hypermodel = PluginHyperModel(cnnforge.get("architecture", "simple_cnn"), dataset.spec)
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    x, y = _all_training(dataset)
    start = time.perf_counter()
    hypermodel.fit(hp, model, x, y, epochs=SEED_EPOCHS, batch_size=SEED_BATCH, verbose=0)
    seconds = time.perf_counter() - start
    probabilities = model.predict(dataset.x_test.astype("float32"), batch_size=512, verbose=0)
    accuracy = float(np.mean(probabilities.argmax(1) == dataset.y_test))
    return _figures(seconds, len(x), accuracy)


def xla_ratio(dataset) -> dict:
    """Images/s of one training epoch with XLA over without (whole batches: no recompiling)."""
    import keras

    from cnnforge.modeling import training

    x, y = _all_training(dataset)
    data = training.training_data(
        x[:12800],
        y[:12800],
        training.Recipe(),
        num_classes=dataset.spec.num_classes,
        batch_size=128,
        seed=0,
    )
    speeds = {}
    for jit in (False, True):
        model = _seed_network(dataset.spec)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            jit_compile=jit,
            loss=keras.losses.CategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        model.fit(data, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        speeds["xla" if jit else "no_xla"] = round(12800 / (time.perf_counter() - start))
    return {**speeds, "ratio": round(speeds["xla"] / speeds["no_xla"], 3)}


def _all_training(dataset):
    return (
        np.concatenate([dataset.x_train, dataset.x_val]),
        np.concatenate([dataset.y_train, dataset.y_val]),
    )


def _figures(seconds: float, images: int, accuracy: float) -> dict:
    return {
        "seconds": round(seconds, 1),
        "images_per_s": round(images * SEED_EPOCHS / seconds),
        "test_accuracy": accuracy,
    }


def budgeted_search(out: Path, data: str) -> dict:
    """(3): the documented command, timed from outside."""
    run_dir = out / "search-run"
    command = BUDGET_COMMAND.format(data=data, run_dir=run_dir)
    start = time.perf_counter()
    done = subprocess.run(shlex.split(command), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (out / "search-run.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"the budgeted command failed ({done.returncode}); see {out / 'search-run.log'}")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    summary = json.loads((run_dir / "search.json").read_text())
    trials = (run_dir / "trials.csv").read_text().count("\n") - 1
    return {
        "command": command,
        "wall_seconds": round(seconds, 1),
        "onnx_test_accuracy": evaluation["accuracy"],
        "test_images": evaluation["images"],
        "trials": trials,
        "best_trial": summary["trial_id"],
        "best_val_accuracy": summary["score"],
        "final_training": summary["final_training"],
        "best_hyperparameters": summary["hyperparameters"],
    }


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=FASHION_MNIST)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    import cnnforge

    cnnforge.load_plugins()
    dataset = cnnforge.load_dataset(args.data, val_fraction=0.1, seed=0)
    results["seed"] = seed_way(dataset)
    print("seed way:", results["seed"], flush=True)
    results["pipeline"] = pipeline_way(dataset)
    results["pipeline"]["images_per_s_ratio"] = round(
        results["pipeline"]["images_per_s"] / results["seed"]["images_per_s"], 3
    )
    print("cnnforge pipeline:", results["pipeline"], flush=True)
    results["xla"] = xla_ratio(dataset)
    print("XLA on this machine (images/s):", results["xla"], flush=True)
    if not args.skip_search:
        results["search"] = budgeted_search(args.out, args.data)
        print(
            "budgeted search:",
            {k: v for k, v in results["search"].items() if k != "best_hyperparameters"},
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
