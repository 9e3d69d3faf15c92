"""What a search process sets while it runs, and restores after: SIGTERM as Ctrl-C,
KerasTuner's settings and role, the training precision, deterministic ops, and the objects that
existed before the search kept out of the garbage collector's sight."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from cnnforge.modeling import training
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.distributed import kerastuner_role
from cnnforge.tuning.tuners import kerastuner_settings


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a search like Ctrl-C: KerasTuner's state is saved, the trial re-runs later."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


DEBUG_ENV = "CNNFORGE_DEBUG"  # set by the CLI's --debug


@contextlib.contextmanager
def search_context(config: SearchConfig, debug: bool | None) -> Iterator[None]:
    """What a search process sets while it runs, and restores after: KerasTuner's settings
    (atomic state, tracebacks only when ``debug``; None: the ``CNNFORGE_DEBUG`` variable), its
    role in a distributed search, the training precision, deterministic ops if asked for."""
    if debug is None:
        debug = bool(os.environ.get(DEBUG_ENV))
    with (
        kerastuner_settings(debug=debug),
        kerastuner_role(config),
        training.precision_policy(config.precision),
        training.op_determinism(config.deterministic),
        earlier_objects_frozen(),
    ):
        yield


@contextlib.contextmanager
def earlier_objects_frozen() -> Iterator[None]:
    """Keep the objects that exist when the search starts (~380,000 after importing TensorFlow,
    Keras and KerasTuner) out of the garbage collector's sight while it runs, and give them back
    after. Keras' ``clear_session`` and KerasTuner call ``gc.collect()`` two or three times a
    trial, and each call walked all of them (~0.4 s on 2 EPYC cores: a fifth of a small
    search's time in a profile). Left alone when the caller has frozen objects of its own."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
