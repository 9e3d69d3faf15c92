"""The ``auto`` search's plan as a run makes it: from the counts asked for, or from the budget at
the first candidate's pace (a probe, or its FLOPs with ``--deterministic``), then at rung 0's
candidates' own costs; a resume takes the recorded plan and a distributed worker the chief's."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import keras
import keras_tuner

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.rundir import RunDir
from cnnforge.data.dataset import Dataset, final_training_examples
from cnnforge.modeling.hypermodel import PluginHyperModel
from cnnforge.modeling.training import SAFETY
from cnnforge.tuning.auto import PAIRED, candidate_list
from cnnforge.tuning.candidate import measure_candidate
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.costs import COST_SHARE, cost_ratios
from cnnforge.tuning.plan import (
    MIN_PROBED_BUDGET_S,
    Probe,
    SearchPlan,
    budget_plan,
    count_plan,
    final_reserve,
    nominal_probe,
    probe,
)


def make_plan(
    config: SearchConfig,
    dataset: Dataset,
    hypermodel: PluginHyperModel,
    hps: keras_tuner.HyperParameters,
    priors: list[dict[str, Any]],
    started: float | None,
    keep_after: float,
) -> SearchPlan:
    """The auto search's plan: one made from the counts asked for (without a budget); else
    the one the run directory recorded (a resume; a distributed worker always takes the
    chief's, waiting for it under a budget), else one made from the budget at the first
    candidate's pace (measured by a probe, or derived from its FLOPs with ``--deterministic``),
    within ``--max-trials`` and ``--epochs`` when given. ``hps``: the whole space, with --fix and --space over it; a budget
    counts from ``started`` (a ``time.time()``) and keeps ``keep_after`` seconds for later."""
    batch = config.batch_size
    train = round(len(dataset.y_train) * config.search_fraction)
    kinds = {hp.name: type(hp).__name__ for hp in hps.space}  # the last: --fix over the plugin
    paired = sum(kinds.get(name) not in (None, "Fixed") for name in PAIRED)
    budget = config.effective_time_budget()
    run = RunDir(config.run_dir)
    if config.distributed == "worker" and budget is not None:
        return _chiefs_plan(config, run)
    saved = run.read_json(run.plan) if run.plan.is_file() else None
    if saved and (config.distributed == "worker" or (budget and saved["basis"] != "counts")):
        return SearchPlan.from_json(saved)
    if budget is None or config.distributed == "worker":  # made again on resume: a larger
        plan = count_plan(config.max_trials, config.epochs, batch, train, paired)  # --max-trials
        return replace(plan, validation_examples=len(dataset.y_val))
    first = hps.copy()
    first.values = candidate_list(hps.space, priors, 1, config.seed)[0]
    pace, basis = _first_candidates_pace(config, dataset, hypermodel, first)
    costs = None
    final = final_training_examples(dataset, config.seed) if config.retrain else 0
    for _ in range(2):  # planned at the probe's pace, then at rung 0's candidates' own
        # a --deterministic plan does not read the clock: the same budget, the same plan
        spent = time.time() - started if started and not config.deterministic else 0.0
        plan = budget_plan(
            budget - keep_after - spent,
            pace,
            train_examples=train,
            final_examples=final,
            batch_size=batch,
            paired=paired,
            basis=basis,
            max_trials=config.max_trials,
            max_epochs=config.epochs,
            costs=costs,
        )
        if basis not in ("probe", "flops") or costs is not None:
            break
        count = plan.rungs[0].candidates
        limit = None if config.deterministic else COST_SHARE * budget
        costs = cost_ratios(
            hypermodel, hps, candidate_list(hps.space, priors, count, config.seed), pace, limit
        )
    if not config.deterministic:  # a --deterministic plan runs whole, by no clock
        _check_budget_holds(plan, budget, keep_after + spent)
    return replace(plan, validation_examples=len(dataset.y_val))


def _check_budget_holds(plan: SearchPlan, budget: float, taken: float) -> None:
    """Refuse a budget in which the search's clock would start no trial: it must hold one trial
    of one epoch and the final training's reserve (one epoch), beside the ``taken`` seconds
    (spent before planning, kept for after the search)."""
    overhead = plan.trial_overhead_s or 0.0
    needed = taken + overhead + (plan.seconds_per_epoch or 0.0)
    if plan.final_epochs:
        needed += final_reserve(1, plan.final_epoch_seconds or 0.0, overhead, SAFETY)
    if budget < needed:
        smallest = 10 * math.ceil(needed / 10)
        raise CnnforgeError(
            f"time budget {budget:g}s is too short for this data and model: one trial of one "
            f"epoch and the final training need about {smallest}s at the pace planned; "
            f"give --time-budget {smallest}s or more"
        )


def _chiefs_plan(config: SearchConfig, run: RunDir) -> SearchPlan:
    """A worker's plan under a time budget: the chief's, which depends on the chief's probe and
    clock. The chief writes plan.json before it serves; a worker started with it waits for the
    file up to ``worker_timeout`` seconds rather than plan alone."""
    give_up = time.monotonic() + config.worker_timeout
    while not run.plan.is_file():
        if time.monotonic() >= give_up:
            raise CnnforgeError(
                f"no plan from the chief in {run.plan} after {config.worker_timeout:g} s; start "
                "the chief first, and give chief and workers the same --run-dir on a shared "
                "filesystem (or a longer --worker-timeout)"
            )
        time.sleep(0.5)
    return SearchPlan.from_json(run.read_json(run.plan))


def _first_candidates_pace(
    config: SearchConfig, dataset: Dataset, hypermodel: PluginHyperModel, first: Any
) -> tuple[Probe, str]:
    """The probe's pace, or with ``--deterministic`` the one derived from FLOPs; where the
    first candidate cannot be measured or trained, a nominal pace (its trial will say why)."""
    val = len(dataset.y_val)
    if not config.deterministic and config.effective_time_budget() < MIN_PROBED_BUDGET_S:
        return nominal_probe(None, val), "nominal"
    try:
        if config.deterministic:
            measured = measure_candidate(hypermodel.build(first), config.target())
            return nominal_probe(measured.get("flops"), val), "flops"
        x, y = dataset.x_train, dataset.y_train
        return probe(
            hypermodel, first, x, y, batch_size=config.batch_size, val_examples=val
        ), "probe"
    except Exception:
        return nominal_probe(None, val), "nominal"
    finally:
        keras.backend.clear_session()
