"""The ``auto`` search's oracle: successive halving over the plugin's priors, then paired
trials (its plan is made by ``auto_plan.make_plan``).

Candidates are the plugin's priors (``@architecture(..., priors=...)``: known-good settings,
adapted to the data), each kept within ``--fix`` and ``--space``, then variants of them with a
few hyperparameters drawn at random: the space is searched around what is known to work. Rung 0
trains the first ``candidates`` for its epochs; each next rung takes the best of the one before
(rung by rung, so workers wait for a rung to end). At the top rung's length the winner is run
again with each of ``PAIRED`` toggled: what pays only over a longer schedule (flips,
augmentation) is decided by validation at the length where it shows. The best trial at the top
length wins; shorter trials only choose who gets there.

Everything is derived from the trials KerasTuner saves (``tuner/rung``, ``tuner/candidate`` in
each trial's values) and from the seed, so a resumed search continues the same plan.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import keras_tuner

from cnnforge.core.rundir import RunDir
from cnnforge.tuning.plan import SearchPlan, pairs_can_tell

TrialStatus = keras_tuner.engine.trial.TrialStatus
COMPLETED = TrialStatus.COMPLETED
ENDED = (COMPLETED, TrialStatus.FAILED, TrialStatus.INVALID, TrialStatus.STOPPED)
# Regularisers decided by a paired trial at the top rung, each as (off, on): the winner's value
# is toggled to the other one (any value but off counts as on).
PAIRED = {"flip": (False, True), "augment": ("none", "subtle")}
MUTATED = 3  # hyperparameters drawn at random in a variant of a prior
RUNG, CANDIDATE, EPOCHS = "tuner/rung", "tuner/candidate", "tuner/epochs"


def allowed(hp: Any, value: Any) -> bool:
    """Whether ``value`` is one ``hp`` (a KerasTuner hyperparameter) can take."""
    kind = type(hp).__name__
    if kind == "Fixed":
        return value == hp.value
    if kind == "Boolean":
        return isinstance(value, bool)
    if kind == "Choice":
        return value in hp.values
    try:
        return hp.min_value <= value <= hp.max_value
    except TypeError:
        return False


def within_space(space: list[Any], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` for every hyperparameter of ``space``: the given value where the space (with
    its ``--fix`` and ``--space``) allows it, else the hyperparameter's default."""
    return {
        hp.name: values[hp.name]
        if hp.name in values and allowed(hp, values[hp.name])
        else hp.default
        for hp in space
    }


def candidate_list(
    space: list[Any], priors: list[dict[str, Any]], count: int, seed: int
) -> list[dict[str, Any]]:
    """``count`` distinct candidates: the priors in order (kept to the space), the plugin's
    defaults, then variants of those in turn, each with ``MUTATED`` tunable hyperparameters
    drawn at random (seeded)."""
    space = list({hp.name: hp for hp in space}.values())  # a name twice: the later (--fix) wins
    rng = random.Random(seed)
    seen: set[str] = set()
    found: list[dict[str, Any]] = []

    def add(values: dict[str, Any]) -> None:
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            found.append(values)

    for prior in [*priors, {}]:  # {}: the plugin's defaults, the baseline
        add(within_space(space, prior))
    bases = list(found)
    tunable = [hp for hp in space if type(hp).__name__ != "Fixed"]
    attempts = 0
    while len(found) < count and tunable and attempts < 50 * count:
        base = dict(bases[attempts % len(bases)])
        for hp in rng.sample(tunable, min(MUTATED, len(tunable))):
            base[hp.name] = hp.random_sample(rng.randrange(2**31))
        add(base)
        attempts += 1
    return found[:count]


class AutoOracle:
    """Oracle mixin (over KerasTuner's ``Oracle``) that runs a ``SearchPlan``."""

    plan: SearchPlan
    priors: list[dict[str, Any]]
    search_seed: int = 0

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        for rung in range(len(self.plan.rungs)):
            chosen = self._rung_candidates(rung)
            if chosen is None:  # the rung below has trials still running
                return {"status": TrialStatus.IDLE}
            missing = [c for c in chosen if self._trial_of(rung, c) is None]
            if missing:
                epochs = self._rung_epochs(rung, chosen)
                if epochs is None or not self._ends_in_time(rung, missing[0], epochs):
                    return self._done()  # no time left for it: the search ends here
                return self._running(rung, missing[0], epochs)
        paired = self._paired_candidates()
        if paired is None:
            return {"status": TrialStatus.IDLE}
        top = len(self.plan.rungs)
        for candidate, values in paired[: self._paired_that_fit(paired)]:
            if self._trial_of(top, candidate) is None:
                return self._running(top, candidate, self._top_epochs(), values)
        return self._done()

    def _done(self) -> dict[str, Any]:
        """Nothing more to start: STOPPED, or IDLE while other tuners hold trials (one whose
        worker falls silent goes back in the queue, and someone must be left to run it)."""
        busy = bool(getattr(self, "ongoing_trials", None))
        return {"status": TrialStatus.IDLE if busy else TrialStatus.STOPPED}

    # --- fitting the rungs to the time left ---------------------------------------------------

    def _rung_epochs(self, rung: int, chosen: list[int]) -> int | None:
        """The epochs of ``rung``: as its first trial ran; the plan's for rung 0 or without a
        deadline; else as many as let this rung, the rungs above it and the paired trials end
        by the deadline at the paces the candidates measured in the rung below; if that is
        not more than the rung below had, as many as fit without the paired trials, then
        without the rungs above (this one the last). None: not even that is longer than the
        rung below (the longer rung would not tell more)."""
        started = self._rung_trials(rung)
        if started:
            return started[0].hyperparameters.values[EPOCHS]
        planned = self.plan.rungs[rung].epochs
        if rung == 0 or getattr(self, "deadline", None) is None:
            return planned
        paces = [self._epoch_seconds(self._trial_of(rung - 1, c)) for c in chosen]
        mean = sum(paces) / len(paces)
        # epochs of this rung and after it, per epoch of this rung: each rung doubles them
        later = sum(
            step.candidates * 2 ** (r - rung) for r, step in enumerate(self.plan.rungs) if r > rung
        )
        paired = self.plan.paired * 2 ** (len(self.plan.rungs) - 1 - rung)
        below = self._rung_trials(rung - 1)[0].hyperparameters.values[EPOCHS]
        for after in (later + paired, later, 0):
            per_epoch = sum(paces) + mean * after
            if per_epoch <= 0:  # no cost recorded (a worker without the run directory)
                return planned
            epochs = min(planned, math.floor((self.deadline - time.time()) / per_epoch))
            if epochs > below:
                return epochs
        return None

    def _ends_in_time(self, rung: int, candidate: int, epochs: int) -> bool:
        """Whether a trial of ``candidate`` for ``epochs`` ends by the deadline, at its pace in
        the rung below (rung 0: the plan's, its own where the plan costed it). One that would not is cut short: unfinished, it
        would tell nothing at its length. The first trial always starts: a search needs a
        winner."""
        deadline = getattr(self, "deadline", None)
        if deadline is None or not any(t.status == COMPLETED for t in self.trials.values()):
            return True
        if rung == 0:  # its own planned epoch where the plan costed it
            each = self.plan.rung0_epoch_seconds or []
            per_epoch = each[candidate] if candidate < len(each) else self.plan.seconds_per_epoch
            per_epoch = per_epoch or 0.0
            seconds = (self.plan.trial_overhead_s or 0.0) + epochs * per_epoch
        else:  # its measured epochs, its overhead spread over them
            seconds = self._epoch_seconds(self._trial_of(rung - 1, candidate)) * epochs
        return time.time() + seconds <= deadline

    def _top_epochs(self) -> int:
        """The epochs the top rung ran (the paired trials run as many, to compare)."""
        top = self._rung_trials(len(self.plan.rungs) - 1)
        return top[0].hyperparameters.values[EPOCHS] if top else self.plan.top_epochs

    def _paired_that_fit(self, paired: list[tuple[int, dict[str, Any]]]) -> int:
        """How many paired trials end by the deadline at the winner's measured pace."""
        if not paired or getattr(self, "deadline", None) is None:
            return len(paired)
        top = len(self.plan.rungs)
        done = sum(self._trial_of(top, c) is not None for c, _ in paired)
        each = self._epoch_seconds(self._top_leader()) * self._top_epochs()
        if each <= 0:  # no cost recorded (a worker without the run directory)
            return len(paired)
        return done + max(0, math.floor((self.deadline - time.time()) / each))

    def _epoch_seconds(self, trial: Any) -> float:
        """What an epoch of ``trial``'s candidate took, its share of the trial's overhead in."""
        cost = self._cost(trial)
        return (cost.get("duration_s") or 0.0) / max(1, cost.get("epochs") or 1)

    def _cost(self, trial: Any) -> dict[str, Any]:
        return RunDir.of_tuner(self._project_dir).read_cost(trial.trial_id)

    def _whole(self, trial: Any) -> bool:
        """Whether ``trial`` ran all its epochs (the deadline cuts a trial short)."""
        run = self._cost(trial).get("epochs")
        return run is None or run >= trial.hyperparameters.values.get(EPOCHS, 0)

    def candidates(self) -> list[dict[str, Any]]:
        """Rung 0's candidates (computed once: the seed and the space decide them)."""
        if getattr(self, "_candidates", None) is None:
            count = self.plan.rungs[0].candidates
            self._candidates = candidate_list(
                self.hyperparameters.space, self.priors, count, self.search_seed
            )
        return self._candidates

    def _running(
        self, rung: int, candidate: int, epochs: int, values: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        chosen = dict(values if values is not None else self.candidates()[candidate])
        chosen.update({RUNG: rung, CANDIDATE: candidate, EPOCHS: epochs})
        return {"status": TrialStatus.RUNNING, "values": chosen}

    def _trial_of(self, rung: int, candidate: int) -> Any:
        for trial in self.trials.values():
            values = trial.hyperparameters.values
            if values.get(RUNG) == rung and values.get(CANDIDATE) == candidate:
                return trial
        return None

    def _ranked(self, trials: list[Any]) -> list[Any]:
        """Completed ``trials``, best first (ties: the earlier candidate)."""
        done = [t for t in trials if t.status == TrialStatus.COMPLETED and t.score is not None]
        sign = -1 if self.objective.direction == "max" else 1
        return sorted(done, key=lambda t: (sign * t.score, t.hyperparameters.values[CANDIDATE]))

    def _rung_trials(self, rung: int) -> list[Any]:
        return [t for t in self.trials.values() if t.hyperparameters.values.get(RUNG) == rung]

    def _rung_candidates(self, rung: int) -> list[int] | None:
        """The candidates of ``rung``: for rung 0 the first ones; above, the best of the rung
        below once all its trials ended (None while some still run)."""
        wanted = self.plan.rungs[rung].candidates
        if rung == 0:
            return list(range(min(wanted, len(self.candidates()))))
        chosen_below = self._rung_candidates(rung - 1)
        below = self._rung_trials(rung - 1)
        if chosen_below is None or len(below) < len(chosen_below):
            return None
        if any(t.status not in ENDED for t in below):
            return None
        chosen = [t.hyperparameters.values[CANDIDATE] for t in self._ranked(below)[:wanted]]
        return self._cheapest_first(chosen)

    def _cheapest_first(self, chosen: list[int]) -> list[int]:
        """``chosen`` in the order of their planned epoch cost (``rung0_epoch_seconds``, fixed
        in the plan, so a resumed or repeated search runs them in the same order; ties and
        candidates it does not cost keep their rank). The final training is reserved at the
        leader's pace: a dear candidate run first leads its rung alone, and its reserve can
        leave no time for the cheap one."""
        each = self.plan.rung0_epoch_seconds or []
        costs = {c: each[c] if c < len(each) and each[c] else math.inf for c in chosen}
        return sorted(chosen, key=lambda c: costs[c])

    def _top_leader(self) -> Any:
        """The top rung's leader, the trial the final training is reserved for: its best,
        unless that one's final would not fit and another's within the noise would
        (``_one_whose_final_fits``); None before any of its trials completed."""
        ranked = self._one_whose_final_fits(
            self._ranked(self._rung_trials(len(self.plan.rungs) - 1))
        )
        return ranked[0] if ranked else None

    def _paired_candidates(self) -> list[tuple[int, dict[str, Any]]] | None:
        """The top rung's leader (``_top_leader``) with each paired regulariser toggled (where
        the space lets it change), numbered after rung 0's candidates. The leader, not the best
        score: a 30-minute run toggled its wider prior, whose final training then got 14 of
        its 24 epochs (93.62 %; the first prior with its whole final: 93.78-93.80 %)."""
        if not self.plan.paired or not pairs_can_tell(self._top_epochs(), self.plan.final_epochs):
            return []  # none planned, or the top rung was fitted too short to tell
        top = self._rung_trials(len(self.plan.rungs) - 1)
        if any(t.status not in ENDED for t in top):
            return None
        leader = self._top_leader()
        if leader is None:
            return []
        winner = {
            k: v for k, v in leader.hyperparameters.values.items() if not k.startswith("tuner/")
        }
        space = {hp.name: hp for hp in self.hyperparameters.space}
        variants = []
        for name in PAIRED:
            if name in winner and allowed(space[name], _toggled(name, winner[name])):
                variants.append({**winner, name: _toggled(name, winner[name])})
        first = len(self.candidates())
        return [(first + i, values) for i, values in enumerate(variants[: self.plan.paired])]

    def get_best_trials(self, num_trials: int = 1) -> list[Any]:
        """The best trials at the longest length any trial ran whole, then the rest: a short
        trial only chose which candidates went on, and one the deadline cut short (its
        schedule unfinished) ranks after those. A paired trial ranks above the winner it
        toggles only when it beats it by more than the validation noise (``_clear_of``)."""
        whole = [
            t for t in self.trials.values() if t.status == TrialStatus.COMPLETED and self._whole(t)
        ]
        longest = max((t.hyperparameters.values.get(EPOCHS, 0) for t in whole), default=0)
        at_top = [t for t in whole if t.hyperparameters.values.get(EPOCHS, 0) == longest]
        rest = [t for t in super().get_best_trials(len(self.trials)) if t not in at_top]
        ranked = self._paired_kept_to_noise(self._ranked(at_top))
        return (self._one_whose_final_fits(ranked) + rest)[:num_trials]

    def _one_whose_final_fits(self, ranked: list[Any]) -> list[Any]:
        """``ranked`` with its leader put after the best of the others within the validation
        noise of it (``_clear_of``) whose final training fits its share of the budget, when
        the leader's own does not (``final_fits``, set under a time budget): a slower
        candidate ahead by a few images' noise kept the whole share for its final training,
        ended the default run's search at rung 0 and trained its final model 26 epochs, where
        the first prior would have had 54."""
        fits = getattr(self, "final_fits", None)
        if fits is None or not ranked or fits(self._cost(ranked[0])):
            return ranked
        leader = ranked[0]
        for trial in ranked[1:]:
            if not self._clear_of(leader, trial) and fits(self._cost(trial)):
                return [trial] + [t for t in ranked if t is not trial]
        return ranked

    def _paired_kept_to_noise(self, ranked: list[Any]) -> list[Any]:
        """``ranked`` with the top rung's winner ahead of each paired trial that toggles it
        without the evidence its direction needs: one that takes a regulariser away must beat
        the winner by more than the validation noise (``_clear_of``); one that adds a
        regulariser must not fall short of it by more than that. At a trial's length
        augmentation reads as a loss that the final training's longer schedule turns into a
        gain (flips on all of Fashion-MNIST: 0.25 points under at 12 epochs, 0.3 over at 24),
        so a tie goes to the regulariser."""
        base, first_paired = self._top_leader(), len(self.candidates())
        if base is None or base not in ranked:
            return ranked
        base_at = ranked.index(base)

        def before_base(at: int, trial: Any) -> bool:
            if trial.hyperparameters.values[CANDIDATE] < first_paired:
                return at < base_at
            if _adds_a_regulariser(trial.hyperparameters.values, base.hyperparameters.values):
                return trial.score >= base.score or not self._clear_of(base, trial)
            return self._clear_of(trial, base)

        ahead = [t for at, t in enumerate(ranked) if t is not base and before_base(at, t)]
        return ahead + [base] + [t for t in ranked if t not in ahead and t is not base]

    def _clear_of(self, trial: Any, base: Any) -> bool:
        """Whether ``trial`` beats ``base`` by more than one standard error of ``base``'s
        validation accuracy, sqrt(p(1-p)/n) (1.2 points at 0.86 on 800 images; 0.3 at 0.93 on
        6,000): paired trials are few and short, and a toggle decided by a few images' noise
        undid what the final training's longer schedule needed. Any margin only applies to
        an accuracy objective on a known number of validation images."""
        n = self.plan.validation_examples
        if not n or not self.objective.name.endswith("accuracy"):
            return True
        p = min(max(base.score, 0.0), 1.0)
        return trial.score - base.score > math.sqrt(p * (1 - p) / n)


def _toggled(name: str, value: Any) -> Any:
    """The other of ``PAIRED[name]``'s off and on for ``value``."""
    off, on = PAIRED[name]
    return on if value == off else off


def _adds_a_regulariser(values: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a paired trial's ``values`` turn on one of ``PAIRED`` that ``base`` has off."""
    return any(
        name in values and values[name] != base.get(name) and values[name] != PAIRED[name][0]
        for name in PAIRED
    )
