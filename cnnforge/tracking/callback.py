"""The Keras callback that hands each epoch's scalars to the trackers."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import keras


def learning_rate(model: keras.Model) -> float | None:
    """The optimizer's learning rate now (a schedule's current value); None when it has none
    that reads as a number. Never raises: this runs inside the trial's training."""
    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:
        return None


class EpochScalars(keras.callbacks.Callback):
    """After each epoch: its logs (loss, accuracy, val_*), the learning rate and the training
    throughput (images/s over the training batches, validation left out), to ``log``."""

    def __init__(
        self, log: Callable[[int, Mapping[str, float]], None], batch_size: int | None
    ) -> None:
        super().__init__()
        self._log = log
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start, self._last, self._steps = time.perf_counter(), None, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._last = time.perf_counter()
        # several steps run per call; ``batch`` is the last one's index, as if the call were
        # full (the epoch's last call may not be)
        self._steps = min(batch + 1, self.params.get("steps") or batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        scalars = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        scalars.pop("learning_rate", None)  # Keras logs it for some schedules; ours is current
        rate = learning_rate(self.model)
        if rate is not None:
            scalars["learning_rate"] = rate
        if self.batch_size and self._last is not None and self._last > self._start:
            scalars["images_per_s"] = self._steps * self.batch_size / (self._last - self._start)
        self._log(epoch, scalars)


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
