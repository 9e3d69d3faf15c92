"""How the ``auto`` search spends its time: the plan, written to ``RUN/plan.json``.

A plan is successive halving over a list of candidates (the plugin's priors first): rung 0 trains
``candidates`` of them for ``epochs``, each following rung keeps the better half and doubles the
epochs. Every trial is a complete schedule of its own (a cosine decays to zero at its last
epoch), trained from scratch: a short trial is not a slice of a long one. At the top rung's
length the winner is run again with each regulariser the validation has to decide (``paired``:
flips, augmentation), then the best of the top-rung trials is trained on train+validation for
``final_epochs``.

Under a time budget the plan comes from a short probe: the first candidate trained for two
epochs on up to ``PROBE_IMAGES`` images gives the seconds per example (and per trial, building
and measuring included). The final training gets what its epochs take (at most
``FINAL_SHARE`` of the budget); the search gets the rest, on as many training images as leave
it ``SEARCH_EPOCHS_WANTED`` epochs' worth of time, and the largest halving schedule that fits in
it, rung 0's candidates each planned at its own cost where ``costs`` counted them (their FLOPs
against the probe's). With ``--deterministic`` the pace is not measured but derived from the candidate's FLOPs at ``NOMINAL_TRAIN_GFLOPS``, so the same
seed plans the same trials on any machine. With ``--max-trials`` or ``--epochs`` and no budget,
the plan is made from those counts instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

DEFAULT_BUDGET_S = 270.0  # a search (cnnforge run: the whole job) with neither budget nor counts
FINAL_SHARE = 0.5  # the most of the budget the final training takes
SEARCH_EPOCHS_WANTED = 150  # search images chosen so the search has this many epochs of time
MIN_SEARCH_EXAMPLES = 8192
# Where the candidates' costs were not counted (``costs``), a search epoch is planned this much
# slower than the probed candidate's: the others are wider or narrower (measured on
# Fashion-MNIST: the wider prior trains at about a third of the first one's pace, the faster
# one at 1.5x); rungs above the first are fitted to the time left at their candidates'
# measured paces (``auto.AutoOracle``).
SEARCH_SAFETY = 1.3
TOP_EPOCHS_MAX = 24
# A paired trial runs at the top rung's length, which must be at least this share of the final
# training's epochs: shorter, augmentation shows as a loss it turns into a gain later
# (simple_cnn's faster prior on the bundled data, validation: -2.9 points at 3 epochs, -1.9 at
# 9, +0.5 at 18, +1.75 at 36; docs/search.md).
PAIRED_MIN_SHARE = 0.5


def pairs_can_tell(top_epochs: int, final_epochs: int) -> bool:
    """Whether paired trials of ``top_epochs`` can decide for a final training of
    ``final_epochs`` (``PAIRED_MIN_SHARE``)."""
    return top_epochs >= PAIRED_MIN_SHARE * final_epochs


# The final training's length: this many optimizer steps, in 24 to 60 epochs (a cosine run on
# a small dataset needs more passes than one on a large one).
FINAL_STEPS, FINAL_EPOCHS_MIN, FINAL_EPOCHS_MAX = 2000, 24, 60
# Training GFLOP/s assumed by a --deterministic plan (3 x forward FLOPs per image): below the
# 110-140 the first prior trains at on a 2-core AMD EPYC (deterministic ops are slower).
NOMINAL_TRAIN_GFLOPS = 80.0
NOMINAL_TRIAL_OVERHEAD_S, NOMINAL_EPOCH_START_S = 5.0, 0.5
# Where no halving schedule fits, the first candidate (the plugin's best-known prior) is the
# winner without a contest: its trial runs this many epochs, a check that it learns on this data
# and a validation figure for the report, and the final training gets the rest of the time. (A
# colour folder of 3,600 images at 6.8 s an epoch: the lone trial had run 16 epochs and the final
# training 15, for 85.25 % on its test split; 87.00 % when a final training of 33 epochs ran.)
LONE_TRIAL_EPOCHS = 3
COUNT_DEFAULTS = {"max_trials": 10, "epochs": 10}  # counts not given to a count plan


@dataclass(frozen=True)
class Rung:
    candidates: int
    epochs: int


@dataclass
class SearchPlan:
    """What the auto search runs: ``rungs`` of successive halving, then ``paired`` variants of
    the winner at the top rung's epochs, then a final training of at most ``final_epochs``."""

    rungs: list[Rung]
    paired: int
    final_epochs: int
    batch_size: int
    search_examples: int
    basis: str  # probe, flops or counts
    seconds_per_epoch: float | None = None  # a search epoch, validation included
    trial_overhead_s: float | None = None
    final_epoch_seconds: float | None = None  # what the search keeps back: final_epochs of these
    # each of rung 0's candidates' epoch, planned from its FLOPs (``costs``); None: not costed
    rung0_epoch_seconds: list[float] | None = None
    # the validation split's size: how far a paired trial must beat the winner it toggles
    # (``auto.AutoOracle.get_best_trials``); None in plans saved before it was recorded
    validation_examples: int | None = None

    @property
    def top_epochs(self) -> int:
        return self.rungs[-1].epochs

    @property
    def trials(self) -> int:
        return sum(r.candidates for r in self.rungs) + self.paired

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> SearchPlan:
        """A plan as ``to_json`` wrote it (keys another version added are ignored)."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in saved.items() if k in known}
        return cls(**{**kept, "rungs": [Rung(**r) for r in saved["rungs"]]})

    def final_seconds(self, margin: float = 1.0) -> float:
        """What the search keeps back for the final training (``final_reserve``)."""
        if not self.final_epochs or not self.final_epoch_seconds:
            return 0.0
        return final_reserve(
            self.final_epochs, self.final_epoch_seconds, self.trial_overhead_s or 0.0, margin
        )

    def summary(self) -> str:
        rungs = ", ".join(f"{r.candidates}×{r.epochs}" for r in self.rungs)
        paired = f" + {self.paired}×{self.top_epochs} paired" if self.paired else ""
        final = f"; final training up to {self.final_epochs} epochs" if self.final_epochs else ""
        return (
            f"{self.trials} trials ({rungs} epochs{paired}) on {self.search_examples} images, "
            f"batch {self.batch_size}{final}"
        )


def final_reserve(epochs: int, epoch_seconds: float, overhead: float, margin: float = 1.0) -> float:
    """The final training's time: its epochs (``margin`` times their planned time) and its
    fixed cost, a trial's overhead (building and tracing the model)."""
    return epochs * epoch_seconds * margin + overhead


def auto_batch_size(examples: int) -> int:
    """128 (the fastest on these CPUs for small CNNs) unless that leaves fewer than ~50 steps an
    epoch: then the power of two that does, at least 32."""
    size = 128
    while size > 32 and examples / size < 50:
        size //= 2
    return size


def final_epochs_cap(final_examples: int, batch_size: int) -> int:
    steps = max(1, math.ceil(final_examples / batch_size))
    return min(FINAL_EPOCHS_MAX, max(FINAL_EPOCHS_MIN, math.ceil(FINAL_STEPS / steps)))


def halving(candidates: int, top_epochs: int, halvings: int) -> list[Rung]:
    """Rungs from ``candidates`` at ``top_epochs / 2**halvings`` epochs to the top rung."""
    rungs = []
    for r in range(halvings + 1):
        epochs = max(1, top_epochs >> (halvings - r))
        rungs.append(Rung(max(1, candidates >> r), epochs))
    return rungs


def count_plan(
    max_trials: int | None, epochs: int | None, batch_size: int, examples: int, paired: int
) -> SearchPlan:
    """A plan from counts: at most ``max_trials`` trials, the top rung at ``epochs``."""
    trials = max_trials or COUNT_DEFAULTS["max_trials"]
    top = epochs or COUNT_DEFAULTS["epochs"]
    paired = paired if trials >= 4 + paired else 0  # pairs only beside a halving of 3 or more
    halvings = 0
    while (2 ** (halvings + 2) - 1) + paired <= trials and top >> (halvings + 1) >= 1:
        halvings += 1
    first = trials - paired - (2**halvings - 1)  # rungs above the first hold 2**r - 1 in all
    rungs = [Rung(first, max(1, top >> halvings))] + [
        Rung(2 ** (halvings - r), max(1, top >> (halvings - r))) for r in range(1, halvings + 1)
    ]
    return SearchPlan(rungs, paired, top, batch_size, examples, "counts")


@dataclass(frozen=True)
class Probe:
    """Measured (or derived) costs the budget plan divides the time with."""

    per_example: float  # seconds per training example
    trial_overhead: float  # building, measuring, tracing: seconds per trial
    val_examples: int
    epoch_start: float = 0.0  # an epoch's first step: iterator, shuffle buffer

    def epoch_seconds(self, examples: int) -> float:
        # validation is a forward pass: about a third of a training step's work
        return (examples + self.val_examples / 3) * self.per_example + self.epoch_start


def budget_plan(
    seconds: float,
    pace: Probe,
    *,
    train_examples: int,
    final_examples: int,
    batch_size: int,
    paired: int,
    basis: str,
    max_trials: int | None = None,
    max_epochs: int | None = None,
    costs: list[float] | None = None,
) -> SearchPlan:
    """The plan that fills ``seconds`` (search and final training) at ``pace``, with at most
    ``max_trials`` trials and ``max_epochs`` a trial where given. ``costs``: the candidates'
    paces over the probe's, in order (``costs.cost_ratios``); without them a search epoch is
    planned ``SEARCH_SAFETY`` times the probe's."""
    final_epochs, final_epoch = 0, final_examples * pace.per_example + pace.epoch_start
    final_seconds = 0.0  # --no-retrain: no final training, all the time to the search
    cap = final_epochs_cap(final_examples, batch_size) if final_examples else 0
    if final_examples:  # building and tracing the final model cost what a trial's do
        share = FINAL_SHARE * seconds - pace.trial_overhead
        final_epochs = max(1, min(cap, math.floor(share / final_epoch)))
        final_seconds = final_reserve(final_epochs, final_epoch, pace.trial_overhead)
    search_seconds = seconds - final_seconds
    wanted = search_seconds / SEARCH_EPOCHS_WANTED / pace.per_example
    examples = min(train_examples, max(MIN_SEARCH_EXAMPLES, round(wanted)))
    if not final_examples:  # the winner is a trial's own model: it sees every image
        examples = train_examples
    epoch = _rung0_epoch(pace.epoch_seconds(examples), costs)
    limits = (max_trials or 10**6, max_epochs or TOP_EPOCHS_MAX)
    best = _best_rungs(search_seconds, epoch, pace.trial_overhead, paired, limits, final_epochs)
    if best is None:  # no search fits
        most = min(TOP_EPOCHS_MAX, limits[1])
        trial, final_epochs = _lone_trial(
            seconds, epoch(1), pace.trial_overhead, most, final_epoch, cap
        )
        best = [trial], 0
    rungs, paired_used = best
    first = rungs[0].candidates
    return SearchPlan(
        rungs,
        paired_used,
        final_epochs,
        batch_size,
        examples,
        basis,
        seconds_per_epoch=epoch(first),
        trial_overhead_s=pace.trial_overhead,
        final_epoch_seconds=final_epoch,
        rung0_epoch_seconds=_each_epoch(pace.epoch_seconds(examples), costs, first),
    )


def _lone_trial(
    seconds: float,
    trial_epoch: float,
    overhead: float,
    most: int,
    final_epoch: float,
    final_cap: int,
) -> tuple[Rung, int]:
    """The first candidate alone, where no search fits: a check of ``LONE_TRIAL_EPOCHS`` and
    the rest of ``seconds`` to its final training (at most ``final_cap`` epochs of
    ``final_epoch`` seconds), or, with no final training (``final_cap`` 0), all of it to the
    trial, whose model is the one exported. Returns the trial's rung and the final epochs."""
    if not final_cap:
        return Rung(1, max(1, min(most, math.floor((seconds - overhead) / trial_epoch)))), 0
    trial = Rung(1, min(most, LONE_TRIAL_EPOCHS))
    left = seconds - _cost([trial], 0, trial_epoch, overhead) - overhead
    return trial, max(1, min(final_cap, math.floor(left / final_epoch)))


def _each_epoch(base: float, costs: list[float] | None, count: int) -> list[float] | None:
    """``count`` candidates' epochs at their ``costs`` (past the costed ones: their mean)."""
    if not costs:
        return None
    mean = sum(costs) / len(costs)
    return [base * (costs[i] if i < len(costs) else mean) for i in range(count)]


def _rung0_epoch(base: float, costs: list[float] | None) -> Callable[[int], float]:
    """A rung 0 of n candidates' mean epoch (planned for every rung: the better half of the
    candidates goes on, whatever their cost)."""
    if not costs:
        return lambda count: base * SEARCH_SAFETY
    return lambda count: sum(_each_epoch(base, costs, count) or [base]) / count


def _best_rungs(
    seconds: float,
    epoch: Callable[[int], float],
    overhead: float,
    paired: int,
    limits: tuple[int, int],
    final_epochs: int,
) -> tuple[list[Rung], int] | None:
    """The halving schedule that fits ``seconds`` with its paired trials (without them if none
    does, or if no top rung fitting reaches ``PAIRED_MIN_SHARE`` of ``final_epochs``) and the
    most candidate epochs at the top (candidates × top epochs), the longer top rung on a
    tie; None if none fits."""
    options = []
    for candidates in (4, 8, 16, 32):
        for halvings in (1, 2, 3):
            if candidates >> halvings < 2:
                continue
            for first in (2, 3, 4, 6, 8):  # a one-epoch schedule ranks by luck
                top = first << halvings
                if top > min(TOP_EPOCHS_MAX, limits[1]):
                    continue
                rungs = halving(candidates, top, halvings)
                tells = pairs_can_tell(top, final_epochs)
                for pairs in sorted({paired if tells else 0, 0}, reverse=True):
                    cost = _cost(rungs, pairs, epoch(candidates), overhead)
                    trials = sum(r.candidates for r in rungs) + pairs
                    if cost <= seconds and trials <= limits[0]:
                        options.append((candidates * top, pairs, top, rungs))
                        break
    if not options:
        return None
    _, pairs, _, rungs = max(options, key=lambda o: (o[1], o[0], o[2]))
    return rungs, pairs


def _cost(rungs: list[Rung], paired: int, epoch: float, overhead: float) -> float:
    trials = sum(r.candidates for r in rungs) + paired
    epochs = sum(r.candidates * r.epochs for r in rungs) + paired * rungs[-1].epochs
    return trials * overhead + epochs * epoch


# A trial's cost beside its epochs is more than the probe's: KerasTuner's bookkeeping,
# checkpoints, trials.csv, tracking (measured: ~3 s on the default network, 2 cores).
MIN_TRIAL_OVERHEAD_S = 3.0
PROBE_IMAGES = 8192  # the probe's two epochs: about 2 s each for the default network
# Under this budget the probe (a model built, traced and trained twice: 5-10 s) would take a
# large share of it, and the plan holds a trial or two whatever the pace: the plan assumes the
# nominal pace and the deadlines keep the budget.
MIN_PROBED_BUDGET_S = 60.0


def probe(hypermodel: Any, hp: Any, x: Any, y: Any, *, batch_size: int, val_examples: int) -> Probe:
    """Train the candidate ``hp`` for two epochs on up to ``PROBE_IMAGES`` of the search's
    images and time the second (whole: its start, every step, the dispatch between them), and
    what a trial costs beside its epochs (building, tracing; at least ``MIN_TRIAL_OVERHEAD_S``
    for the rest: the candidate's measurement, checkpoints, records)."""
    import keras

    start = time.perf_counter()
    keras.backend.clear_session()
    model = hypermodel.build(hp)
    count = min(len(y), PROBE_IMAGES)
    epochs: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epochs.append(time.perf_counter() - epochs.pop()),
    )
    first = np.arange(count)  # an index, not a slice: streamed image files stay streamed
    hypermodel.fit(
        hp,
        model,
        x[first],
        y[first],
        epochs=2,
        batch_size=batch_size,
        callbacks=[timer],
        verbose=0,
    )
    # a plugin's own fit() may drop the callbacks: then half of its whole fit
    epoch = epochs[-1] if epochs else hypermodel.last_fit["fit_seconds"] / 2
    hypermodel.last_fit = {}
    keras.backend.clear_session()
    per_example = epoch / count
    overhead = time.perf_counter() - start - 2 * epoch
    return Probe(per_example, max(MIN_TRIAL_OVERHEAD_S, overhead), val_examples)


def nominal_probe(flops: float | None, val_examples: int) -> Probe:
    """The pace a --deterministic plan assumes: training FLOPs (3 x forward) at the nominal
    rate; the same numbers on any machine, so the same plan."""
    per_example = 3 * (flops or 1e8) / (NOMINAL_TRAIN_GFLOPS * 1e9)
    return Probe(per_example, NOMINAL_TRIAL_OVERHEAD_S, val_examples, NOMINAL_EPOCH_START_S)
