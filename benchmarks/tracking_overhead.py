"""What tracking costs a search: each tracker fed what a search of 5 trials x 10 epochs sends it
(the same calls, the same scalars), straight, in a temporary run directory, timed per call:

    python benchmarks/tracking_overhead.py

"open" includes importing the tracker's library (TensorFlow for TensorBoard, already imported
in a search) and, for MLflow, creating the run directory's SQLite store (its schema
migrations); MLflow is opened twice, so the second shows the store alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnforge.tracking.mlflow import MlflowTracker
from cnnforge.tracking.tensorboard import TensorBoardTracker

TRIALS, EPOCHS = 5, 10
SCALARS = {
    "loss": 1.0,
    "accuracy": 0.5,
    "val_loss": 1.1,
    "val_accuracy": 0.4,
    "learning_rate": 1e-3,
    "images_per_s": 900.0,
}


def timed(call: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def measure(name: str, make: Callable[[Path], Any], root: Path) -> None:
    start = time.perf_counter()
    tracker = make(root / name)
    opened = time.perf_counter() - start
    started = timed(tracker.search_started, {"objective": "val_accuracy"}, ["lr"])
    epochs, trials = [], []
    for trial in map(str, range(TRIALS)):
        begin = timed(tracker.trial_started, trial, {"lr": 1e-3})
        epochs += [timed(tracker.epoch_ended, trial, e, SCALARS) for e in range(EPOCHS)]
        row = {"trial_id": trial, "status": "COMPLETED", "score": 0.4, "params": 1000}
        trials.append(begin + timed(tracker.trial_ended, row))
    tracker.search_ended({"trial_id": "0", "score": 0.4})
    tracker.close()
    print(
        f"{name:<12} open {opened * 1e3:6.0f} ms  search start {started * 1e3:4.0f} ms  "
        f"epoch p50 {statistics.median(epochs) * 1e3:5.1f} ms  "
        f"trial start+end p50 {statistics.median(trials) * 1e3:5.0f} ms"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        measure("tensorboard", TensorBoardTracker, root)
        measure("mlflow", lambda run: MlflowTracker(run, "simple_cnn"), root)
        measure("mlflow again", lambda run: MlflowTracker(run, "simple_cnn"), root)


if __name__ == "__main__":
    main()
