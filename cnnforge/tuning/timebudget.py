"""A search's time budget: when trials must stop so the final training still fits.

The budget covers the whole search, retraining the winner on train+validation included. Trials
may start (and run) until the *search deadline*: the end of the budget less what retraining the
best trial so far will take (its measured seconds per example in steady training steps times
the train+validation examples it trains on, its calibration slice left out, plus its measured
start of an epoch, validation left out, times the epochs it took to its best, with a 5%
margin). Before any trial has ended, half the budget is
kept back. An ``auto`` plan's final training keeps its planned epochs instead, at the pace of
the trial leading now (the probe's before one has ended): a wider winner trains slower than the
probed first candidate, and would otherwise get a fraction of its epochs. The final training then plans the epochs the search found, or as many as still fit,
and plans again after each epoch (``training.FitToDeadline``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from cnnforge.modeling.training import SAFETY
from cnnforge.tuning.plan import FINAL_SHARE, SearchPlan, final_reserve

PRIOR_SHARE = 0.5  # of the budget kept back before any trial has been measured


@dataclass(frozen=True)
class Pace:
    """A trial's training speed: seconds per example in steady steps, and each epoch's start."""

    per_example: float
    epoch_start: float = 0.0

    def epoch_seconds(self, examples: int) -> float:
        return examples * self.per_example + self.epoch_start


def pace(cost: dict[str, Any]) -> Pace | None:
    """How fast a trial trained, from its cost record (None if it trained no whole epoch)."""
    if cost.get("steady_examples"):
        return Pace(cost["steady_seconds"] / cost["steady_examples"], cost["epoch_start_seconds"])
    examples, epochs, seconds = cost.get("examples"), cost.get("epochs"), cost.get("train_seconds")
    if not examples or not epochs or seconds is None:
        return None
    return Pace(seconds / (examples * epochs))


@dataclass
class TimeBudget:
    """``ends_at`` (``time.time()``) is when the search, final training included, must be done;
    ``final_examples`` is what the final training trains on (0: no final training);
    ``overhead`` seconds are kept for what follows the final training."""

    ends_at: float
    total: float
    final_examples: int
    overhead: float = 0.0

    def left(self) -> float:
        return self.ends_at - time.time()

    def final_training_seconds(self, best_pace: Pace | None, epochs: int) -> float:
        """What the final training of ``epochs`` is expected to take at ``best_pace`` (before
        any trial has been measured: a share of the budget)."""
        if not self.final_examples:
            return self.overhead
        if best_pace is None:
            return PRIOR_SHARE * self.total
        return epochs * best_pace.epoch_seconds(self.final_examples) * SAFETY + self.overhead

    def planned_final_seconds(self, plan: SearchPlan, leader: Pace | None) -> float:
        """What the final training of ``plan`` takes at the ``leader``'s pace (None: the pace
        the plan was made at), with the margin; ``overhead`` left out. At most ``FINAL_SHARE``
        of the budget (or the plan's own reserve, if larger)."""
        if not self.final_examples or not plan.final_epochs:
            return 0.0
        # never more than the plan's share of the budget: a slow leader reserving all its
        # epochs cut a 30-minute search to rung 0 (93.27 % against 93.83 % before); past the
        # share, the final trains the epochs that fit (FitToDeadline) instead
        return min(self._final_at(plan, leader), self._final_share(plan))

    def final_fits(self, plan: SearchPlan, leader: Pace | None) -> bool:
        """Whether the final training of ``plan`` at ``leader``'s pace fits, all its planned
        epochs in, both its share of the budget (``planned_final_seconds``) and the time left:
        a leader that overtook late, after the search had spent what a quicker one's final
        left it, fits the share and not the clock. The clock may take one epoch: a trial cut
        at the deadline ends a few seconds after it, and a leader whose final was the one kept
        back must not lose its place to those seconds."""
        if not self.final_examples or not plan.final_epochs:
            return True
        final = self._final_at(plan, leader)
        one_epoch = self._final_epoch_seconds(plan, leader) * SAFETY
        return final <= self._final_share(plan) and final - one_epoch <= self.left() - self.overhead

    def _final_at(self, plan: SearchPlan, leader: Pace | None) -> float:
        if leader is None:
            return plan.final_seconds(margin=SAFETY)
        epoch = self._final_epoch_seconds(plan, leader)
        return final_reserve(plan.final_epochs, epoch, plan.trial_overhead_s or 0.0, SAFETY)

    def _final_epoch_seconds(self, plan: SearchPlan, leader: Pace | None) -> float:
        if leader is None:
            return plan.final_epoch_seconds or 0.0
        return leader.epoch_seconds(self.final_examples)

    def _final_share(self, plan: SearchPlan) -> float:
        return max(plan.final_seconds(margin=SAFETY), FINAL_SHARE * self.total)

    def search_deadline(self, best_pace: Pace | None, best_epochs: int) -> float:
        return self.ends_at - self.final_training_seconds(best_pace, best_epochs)

    def epochs_that_fit(self, best_pace: Pace | None, wanted: int) -> int:
        """``wanted``, or fewer when the time left cannot hold that many (at least one)."""
        if best_pace is None:
            return wanted
        per_epoch = best_pace.epoch_seconds(self.final_examples) * SAFETY
        room = (self.left() - self.overhead) / per_epoch
        return max(1, min(wanted, math.floor(room)))
