"""A distributed search's roles on KerasTuner's chief/worker engine: the ``KERASTUNER_*``
variables that make a process the chief or a worker, and what the chief does while it serves."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.tuners import RecordingTuner

KERASTUNER_VARIABLES = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")


@contextlib.contextmanager
def kerastuner_role(config: SearchConfig) -> Iterator[None]:
    """Set KerasTuner's distributed-search variables for this process while the search runs."""
    if not config.distributed:
        yield
        return
    host, _, port = config.address.rpartition(":")  # type: ignore[union-attr]
    tuner_id = "chief" if config.distributed == "chief" else config.worker_id
    saved = {name: os.environ.get(name) for name in KERASTUNER_VARIABLES}
    os.environ.update(
        KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port
    )
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def watch_as_chief(tuner: RecordingTuner) -> Callable[[], None]:
    """While the chief serves: let silent workers go, and report trials as they end (to the
    front end and the trackers: a distributed search is logged by its chief only). Returns
    what stops the watch, once the trials that ended since its last look are reported."""
    stop, oracle = threading.Event(), tuner.oracle
    reported = set(oracle.end_order)

    def report_ended() -> None:
        for trial_id in [t for t in oracle.end_order if t not in reported]:
            reported.add(trial_id)
            tuner.report_trial_end(oracle.trials[trial_id])

    def watch() -> None:
        while not stop.wait(1.0):
            oracle.expire_silent_tuners()
            report_ended()
        report_ended()

    thread = threading.Thread(target=watch, name="cnnforge-chief-watch", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join()

    return stop_watching
