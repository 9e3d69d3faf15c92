"""TensorBoard: per-epoch scalars of every trial and the HParams dashboard, under
``RUN/tensorboard/`` (one folder per trial; view with ``tensorboard --logdir RUN/tensorboard``).

Each trial's folder holds its epochs (``epoch/loss``, ``epoch/val_accuracy``,
``epoch/learning_rate``, ``epoch/images_per_s``...), its hyperparameters (an HParams session)
and, when it ends, ``trial/objective``, ``trial/latency_ms``, ``trial/params``... which the
HParams dashboard shows beside the hyperparameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnforge.core.rundir import RunDir

# The HParams dashboard's metric columns: tag → what it shows.
TRIAL_METRICS = {
    "trial/objective": "the objective (best epoch)",
    "trial/latency_ms": "ONNX latency, ms",
    "trial/params": "parameters",
    "trial/size_mb": "ONNX size, MB",
    "trial/flops": "FLOPs per image",
    "trial/epochs": "epochs trained",
}


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        import tensorflow as tf

        self._tf = tf
        self.logdir = RunDir(run_dir).tensorboard
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        # trial id → the last epoch its folder holds already (a trial re-run after an
        # interruption logs only the epochs beyond it: no step twice)
        self._logged_to: dict[str, int] = {}

    def _writer(self, trial_id: str) -> Any:
        if trial_id not in self._writers:
            path = self.logdir / f"trial_{trial_id}"
            self._writers[trial_id] = self._tf.summary.create_file_writer(str(path))
        return self._writers[trial_id]

    def search_started(self, search: Mapping[str, Any], hyperparameters: Sequence[str]) -> None:
        from tensorboard.plugins.hparams import api as hp

        writer = self._tf.summary.create_file_writer(str(self.logdir))
        with writer.as_default():
            hp.hparams_config(
                hparams=[hp.HParam(name) for name in hyperparameters],
                metrics=[
                    hp.Metric(tag, display_name=shown) for tag, shown in TRIAL_METRICS.items()
                ],
            )
        writer.close()

    def trial_started(self, trial_id: str, hyperparameters: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams import api as hp

        self._logged_to[trial_id] = self._last_epoch(self.logdir / f"trial_{trial_id}")
        values = {k: _hparam_value(v) for k, v in hyperparameters.items()}
        with self._writer(trial_id).as_default():
            hp.hparams(values, trial_id=f"trial_{trial_id}")

    def epoch_ended(self, trial_id: str, epoch: int, scalars: Mapping[str, float]) -> None:
        if epoch <= self._logged_to.get(trial_id, -1):
            return
        writer = self._writer(trial_id)
        with writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(f"epoch/{name}", value, step=epoch)
        writer.flush()

    def trial_ended(self, trial: Mapping[str, Any]) -> None:
        trial_id = str(trial["trial_id"])
        values = {
            "trial/objective": trial.get("score"),
            "trial/latency_ms": trial.get("latency_ms"),
            "trial/params": trial.get("params"),
            "trial/size_mb": trial.get("size_mb"),
            "trial/flops": trial.get("flops"),
            "trial/epochs": trial.get("epochs"),
        }
        writer = self._writer(trial_id)
        with writer.as_default():
            for tag, value in values.items():
                if value is not None:
                    self._tf.summary.scalar(tag, float(value), step=0)
            self._tf.summary.text("trial/status", str(trial.get("status", "")), step=0)
        writer.close()
        del self._writers[trial_id]

    def search_ended(self, best: Mapping[str, Any] | None) -> None:
        pass  # every trial's folder is complete when it ends

    def winner(self, artifacts: Sequence[Path], onnx: Path | None) -> None:
        pass  # TensorBoard keeps no files

    def _last_epoch(self, folder: Path) -> int:
        """The last ``epoch/*`` step in ``folder``'s event files; -1 if none (a new trial)."""
        last = -1
        for path in sorted(folder.glob("events.out.tfevents.*")):
            for event in self._tf.compat.v1.train.summary_iterator(str(path)):
                if any(v.tag.startswith("epoch/") for v in event.summary.value):
                    last = max(last, event.step)
        return last

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _hparam_value(value: Any) -> bool | int | float | str:
    """HParams take booleans, numbers and text; anything else as its text."""
    return value if isinstance(value, bool | int | float | str) else str(value)
