"""Anytime curves: the best validation accuracy against elapsed time, one wall budget each.

On the same data, split the same way (``load_dataset``, 10 % validation, seed 0), in one run:

1. ``cnnforge``: cnnforge's default search (the ``auto`` tuner, nothing pinned) with the budget as
   ``--time-budget``, then its winner trained again on train+validation and exported;
2. ``random`` and ``hyperband``: the same ``simple_cnn`` plugin searched the way a KerasTuner user
   writes it: ``keras_tuner.RandomSearch`` (its default ``max_trials=10``, 10 epochs a trial) and
   ``Hyperband`` (``max_epochs=10`` as KerasTuner's getting-started guide, factor 3) with
   KerasTuner's other defaults, Keras' ``fit`` on numpy arrays (batch 32), stopped at the
   budget; the best model as ``get_best_models`` gives it (no retraining);
3. ``autokeras`` (only when asked for in ``--methods``; AutoKeras is not a dependency): its
   ``ImageClassifier`` with its defaults, stopped at the budget the same way;
4. ``seed``: the seed network (simple_cnn's defaults) trained the seed's way: 10 epochs, batch 32.

Each point is a trial's end (the seed: an epoch's end) and the best validation accuracy so far.
The test accuracy of each method's final model is measured with onnxruntime on its ONNX export.

    python benchmarks/anytime_search.py --budget 270 --out /tmp/anytime
    pip install --target /tmp/ak --no-deps autokeras==3.0.0 dm-tree
    PYTHONPATH=/tmp/ak python benchmarks/anytime_search.py --budget 270 --out /tmp/anytime \\
        --methods cnnforge,random,hyperband,autokeras,seed

Writes ``anytime.json``, ``anytime.md`` (a table) and ``anytime.png`` (the curves) in ``--out``.
Run it alone on the machine: the curves are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SEED_EPOCHS, KERAS_BATCH = 10, 32


def onnx_test_accuracy(model, dataset) -> float:
    """The model converted by cnnforge's exporter, scored with onnxruntime on the test split."""
    from cnnforge.conversion.export import to_onnx
    from cnnforge.deploy.timing import strict_session

    session = strict_session(to_onnx(model).SerializeToString(), "cpu", None, None)
    name = session.get_inputs()[0].name
    x = np.asarray(dataset.x_test, "float32")
    predicted = np.concatenate(
        [session.run(None, {name: x[i : i + 512]})[0].argmax(1) for i in range(0, len(x), 512)]
    )
    return float((predicted == dataset.y_test).mean())


def run_cnnforge(dataset, data: str, budget: float, work: Path) -> dict:
    from cnnforge.core.rundir import RunDir
    from cnnforge.tuning.config import SearchConfig
    from cnnforge.tuning.search import search

    points, start = [], time.perf_counter()

    class Progress:
        best = 0.0

        def trial_ended(self, record):
            if record.score is not None:
                self.best = max(self.best, record.score)
            points.append((time.perf_counter() - start, self.best))

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    config = SearchConfig(data=data, run_dir=work / "cnnforge", time_budget=budget)
    result = search(config, dataset=dataset, progress=Progress())
    import keras

    model = keras.models.load_model(RunDir(result.run_dir).best_model)
    return {"points": points, "seconds": time.perf_counter() - start, "model": model}


class _KerasUsersHyperModel:
    """simple_cnn as a KerasTuner user's HyperModel: cnnforge builds and compiles it (the
    recipe's optimizer and learning rate), Keras' ``fit`` trains it on numpy arrays."""

    def __new__(cls, spec):
        import keras
        import keras_tuner

        import cnnforge
        from cnnforge.modeling import training
        from cnnforge.modeling.hypermodel import build_model

        plugin = cnnforge.get("architecture", "simple_cnn")

        class HyperModel(keras_tuner.HyperModel):
            def build(self, hp):
                return build_model(plugin, spec, hp)

            def fit(self, hp, model, x, y, validation_data=None, **kwargs):
                # compiled as a Keras user would: the recipe's optimizer with its schedule
                # spanning this fit's steps, one step per call
                epochs = kwargs.get("epochs", 1) - kwargs.get("initial_epoch", 0)
                steps = training.steps_per_epoch(len(x), KERAS_BATCH) * max(1, epochs)
                training.compile_model(
                    model, training.recipe(hp), steps=steps, steps_per_execution=1
                )
                classes = spec.num_classes
                x_val, y_val = validation_data
                return model.fit(
                    np.asarray(x, "float32"),
                    keras.utils.to_categorical(y, classes),
                    validation_data=(
                        np.asarray(x_val, "float32"),
                        keras.utils.to_categorical(y_val, classes),
                    ),
                    **kwargs,
                )

        return HyperModel()


def _best_val_accuracy(tuner) -> float:
    """The best validation accuracy of the tuner's trials so far (AutoKeras' objective is the
    validation loss, so its trials' scores are not this)."""
    values = [t.metrics.get_best_value("val_accuracy") for t in tuner.oracle.trials.values()]
    return float(max((v for v in values if v is not None), default=0.0))


def _stop_at(deadline: float, tuner, points: list, start: float):
    """A callback that ends a fit at ``deadline`` (checked every batch), and ``tuner`` made to
    record each trial's end in ``points`` and to start no trial after the deadline."""
    import keras

    class StopAtBudget(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.time() >= deadline:
                self.model.stop_training = True

    trial_end = tuner.on_trial_end

    def on_trial_end(trial):
        trial_end(trial)
        points.append((time.perf_counter() - start, _best_val_accuracy(tuner)))
        if time.time() >= deadline:
            tuner.oracle.max_trials = len(tuner.oracle.trials)  # no trial after the budget

    tuner.on_trial_end = on_trial_end
    return StopAtBudget()


def run_kerastuner(kind: str, dataset, budget: float, work: Path) -> dict:
    import keras_tuner

    points, start = [], time.perf_counter()
    base = {"random": keras_tuner.RandomSearch, "hyperband": keras_tuner.Hyperband}[kind]
    options = {"max_epochs": 10} if kind == "hyperband" else {"max_trials": 10}
    tuner = base(
        _KerasUsersHyperModel(dataset.spec),
        objective="val_accuracy",
        directory=str(work),
        project_name=kind,
        overwrite=True,
        seed=0,
        **options,
    )
    stop = _stop_at(time.time() + budget, tuner, points, start)
    fit = {"epochs": 10} if kind == "random" else {}
    tuner.search(
        dataset.x_train,
        dataset.y_train,
        validation_data=(dataset.x_val, dataset.y_val),
        batch_size=KERAS_BATCH,
        callbacks=[stop],
        verbose=0,
        **fit,
    )
    model = tuner.get_best_models(1)[0]
    return {"points": points, "seconds": time.perf_counter() - start, "model": model}


def run_autokeras(dataset, budget: float, work: Path) -> dict:
    """AutoKeras' ``ImageClassifier`` with its defaults (100 trials, its own epochs and early
    stopping), stopped at the budget as the KerasTuner methods are; its model as
    ``export_model`` gives it (after its own final fit, if it makes one). AutoKeras 3.0.0 gives
    ``Dense`` a NumPy integer as its units, which keras 3.15 refuses: they are cast to int."""
    import autokeras
    import keras

    dense_init = keras.layers.Dense.__init__

    def takes_numpy_units(self, units, *args, **kwargs):
        dense_init(self, int(units), *args, **kwargs)

    keras.layers.Dense.__init__ = takes_numpy_units
    points, start = [], time.perf_counter()
    try:
        classifier = autokeras.ImageClassifier(
            directory=str(work), project_name="autokeras", overwrite=True, seed=0
        )
        stop = _stop_at(time.time() + budget, classifier.tuner, points, start)
        classifier.fit(
            dataset.x_train,
            dataset.y_train,
            validation_data=(dataset.x_val, dataset.y_val),
            callbacks=[stop],
            verbose=0,
        )
        model = classifier.export_model()
    finally:
        keras.layers.Dense.__init__ = dense_init
    return {"points": points, "seconds": time.perf_counter() - start, "model": model}


def run_seed(dataset) -> dict:
    import keras
    import keras_tuner

    import cnnforge
    from cnnforge.modeling import training
    from cnnforge.modeling.hypermodel import build_model

    points, start, best = [], time.perf_counter(), [0.0]
    hp = keras_tuner.HyperParameters()
    model = build_model(cnnforge.get("architecture", "simple_cnn"), dataset.spec, hp)
    training.compile_model(model, training.recipe(hp), steps_per_execution=1)  # plain Keras

    def epoch_end(epoch, logs):
        best[0] = max(best[0], logs["val_accuracy"])
        points.append((time.perf_counter() - start, best[0]))

    classes = dataset.spec.num_classes
    model.fit(
        np.asarray(dataset.x_train, "float32"),
        keras.utils.to_categorical(dataset.y_train, classes),
        validation_data=(
            np.asarray(dataset.x_val, "float32"),
            keras.utils.to_categorical(dataset.y_val, classes),
        ),
        epochs=SEED_EPOCHS,
        batch_size=KERAS_BATCH,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=epoch_end)],
        verbose=0,
    )
    return {"points": points, "seconds": time.perf_counter() - start, "model": model}


def plot(results: dict, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, result in results.items():
        times = [0.0] + [t for t, _ in result["points"]]
        scores = [np.nan] + [s for _, s in result["points"]]
        axes.step(times, scores, where="post", label=f"{name} (test {result['test']:.2%})")
    axes.axvline(budget, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("elapsed seconds")
    axes.set_ylabel("best validation accuracy so far")
    axes.set_ylim(0.75, 0.95)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist_small")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds per method")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--methods", default="cnnforge,random,hyperband,seed", help="comma-separated"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import keras

    from cnnforge.bench.machine import environment
    from cnnforge.data.dataset import load_dataset

    dataset = load_dataset(args.data, val_fraction=0.1, seed=0)
    work = Path(tempfile.mkdtemp(prefix="anytime-"))
    results = {}
    try:
        for name in args.methods.split(","):
            keras.backend.clear_session()
            keras.utils.set_random_seed(0)
            if name == "cnnforge":
                result = run_cnnforge(dataset, args.data, args.budget, work)
            elif name == "seed":
                result = run_seed(dataset)
            elif name == "autokeras":
                result = run_autokeras(dataset, args.budget, work)
            else:
                result = run_kerastuner(name, dataset, args.budget, work)
            result["test"] = onnx_test_accuracy(result.pop("model"), dataset)
            results[name] = result
            result["points"] = result["points"] or [(result["seconds"], 0.0)]  # none ended
            print(
                f"{name}: best val {result['points'][-1][1]:.4f}, test {result['test']:.4f}, "
                f"{result['seconds']:.0f} s, {len(result['points'])} points",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    record = {
        "data": args.data,
        "budget_s": args.budget,
        "machine": environment(),
        "python": platform.python_version(),
        "results": results,
    }
    (args.out / "anytime.json").write_text(json.dumps(record, indent=2, default=str))
    plot(results, args.budget, args.out / "anytime.png")
    rows = [
        "| method | best validation | at (s) | test, onnxruntime | wall (s) | trials/epochs |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        best_time, best = result["points"][-1]
        first_best = next(t for t, s in result["points"] if s == best)
        rows.append(
            f"| {name} | {best:.4f} | {first_best:.0f} | {result['test']:.2%} | "
            f"{result['seconds']:.0f} | {len(result['points'])} |"
        )
    (args.out / "anytime.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
