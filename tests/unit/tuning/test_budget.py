"""Budget-aware search: a time budget that holds, the final training on train+validation,
trials on a share of the data, the same trials for the same seed, mixed precision."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import types

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cnnforge.cli import cli
from cnnforge.core.durations import parse_duration
from cnnforge.core.errors import CnnforgeError
from cnnforge.tuning import plan as planning
from cnnforge.tuning import timebudget
from cnnforge.tuning.search import SearchConfig, search
from cnnforge.tuning.timebudget import Pace, TimeBudget, pace


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400), ("1h30m", 5400), (" 2 m ", 120)],
)
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "m30", "-5m", "0s", ""])
def test_a_duration_that_is_not_one_is_refused(text):
    with pytest.raises(CnnforgeError, match="time budget"):
        parse_duration(text)


def test_a_long_malformed_duration_is_refused_at_once():
    """The parser is linear: 40 digits and a stray letter (a regex that backtracks took
    exponential time on it) are refused within seconds, in a process the test can kill."""
    code = (
        "from cnnforge.core.errors import CnnforgeError\n"
        "from cnnforge.core.durations import parse_duration\n"
        "try:\n"
        f"    parse_duration({'1' * 40 + 'x'!r})\n"
        "except CnnforgeError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "is not a duration" in done.stdout


def test_the_cli_refuses_a_bad_budget_in_one_line():
    result = CliRunner().invoke(cli, ["search", "--time-budget", "soon"])
    assert result.exit_code == 2
    assert "is not a duration; write e.g. 30m" in result.output
    assert "Traceback" not in result.output


def test_the_reserve_follows_the_best_trials_pace():
    budget = TimeBudget(time.time() + 100, 100, final_examples=1000, overhead=5)
    assert budget.search_deadline(None, 10) == pytest.approx(budget.ends_at - 50)  # prior: half
    # 10 epochs of 1000 examples at 2 ms each plus 0.5 s to start each, the margin, the overhead.
    quick = Pace(0.002, epoch_start=0.5)
    expected = 10 * (2 + 0.5) * timebudget.SAFETY + 5
    assert budget.search_deadline(quick, 10) == pytest.approx(budget.ends_at - expected)
    without_final = TimeBudget(budget.ends_at, 100, final_examples=0, overhead=5)
    assert without_final.search_deadline(None, 10) == pytest.approx(budget.ends_at - 5)
    assert budget.epochs_that_fit(quick, 3) == 3
    assert budget.epochs_that_fit(Pace(0.02), 10) == 4  # 95 s left / 21 s an epoch
    assert budget.epochs_that_fit(Pace(1.0), 10) == 1  # never none


def test_a_plans_final_training_is_reserved_at_the_leaders_pace():
    """The plan was made at the probe's pace (1 ms an example); the leader trains at 3 ms."""
    plan = planning.SearchPlan(
        [planning.Rung(4, 2)], 0, 20, 32, 900, "probe", 0.5, 3.0, final_epoch_seconds=1.0
    )
    budget = TimeBudget(time.time() + 200, 200, final_examples=1000, overhead=5)
    assert budget.planned_final_seconds(plan, None) == pytest.approx(20 * 1.0 * 1.05 + 3)
    leader = Pace(0.003, epoch_start=0.1)
    expected = 20 * (3.0 + 0.1) * timebudget.SAFETY + 3
    assert budget.planned_final_seconds(plan, leader) == pytest.approx(expected)


def test_a_slow_leaders_final_training_keeps_at_most_the_plans_share_of_the_budget():
    """A leader at 3 ms an example would keep 68 s of a 100 s budget for its 20 final epochs,
    ending the search at once: it keeps half the budget (FINAL_SHARE), and the final training
    trains the epochs that fit in what the search leaves."""
    plan = planning.SearchPlan(
        [planning.Rung(4, 2)], 0, 20, 32, 900, "probe", 0.5, 3.0, final_epoch_seconds=1.0
    )
    budget = TimeBudget(time.time() + 100, 100, final_examples=1000, overhead=5)
    leader = Pace(0.003, epoch_start=0.1)
    assert budget.planned_final_seconds(plan, leader) == pytest.approx(50.0)
    quick_plan = planning.SearchPlan(
        [planning.Rung(4, 2)], 0, 20, 32, 900, "probe", 0.5, 3.0, final_epoch_seconds=3.0
    )  # the plan's own reserve (66 s) is more than the share: the leader keeps that much
    assert budget.planned_final_seconds(quick_plan, leader) == pytest.approx(20 * 3.0 * 1.05 + 3)
    no_final = TimeBudget(budget.ends_at, 100, final_examples=0)
    assert no_final.planned_final_seconds(plan, leader) == 0.0
    # whether a trial's final training fits the share: the slow leader's does not, at a third
    # of its pace it does (20 * 1.1 * 1.05 + 3 = 26 s)
    assert not budget.final_fits(plan, leader)
    assert budget.final_fits(plan, Pace(0.001, epoch_start=0.1))
    assert budget.final_fits(plan, None)  # not measured: the plan's own pace, which fits


def test_a_final_training_that_fits_the_share_but_not_the_time_left_does_not_fit(monkeypatch):
    """A 30-minute Fashion-MNIST run's wider prior led by 0.13 points; its final training
    (875 s) fitted half the budget but not the 682 s the search had left, and got 21 of its
    24 epochs (93.82 %) where the first prior, within the noise, would have had all of its.
    The clock may take one epoch: a trial cut at the deadline ends seconds after it."""
    monkeypatch.setattr(timebudget, "time", types.SimpleNamespace(time=lambda: 1000.0))
    plan = planning.SearchPlan(
        [planning.Rung(4, 2)], 0, 20, 32, 900, "probe", 0.5, 3.0, final_epoch_seconds=1.0
    )
    late = TimeBudget(1025.0, 100, final_examples=1000, overhead=5)  # 20 s left for it
    # 20 epochs of 1.1 s, 5 % margin, 3 s fixed: 26.1 s, within the share (50 s), and still
    # 24.9 s with one epoch fewer
    assert not late.final_fits(plan, Pace(0.001, epoch_start=0.1))
    # 20.85 s: over the time left by less than one of its 0.89 s epochs
    assert late.final_fits(plan, Pace(0.00075, epoch_start=0.1))
    assert late.final_fits(plan, Pace(0.0005, epoch_start=0.1))  # 15.6 s


def test_a_trials_pace_separates_epoch_starts_from_steady_steps():
    cost = {
        "steady_seconds": 9.0,
        "steady_examples": 900,
        "epoch_start_seconds": 0.4,
        "train_seconds": 10.2,
        "examples": 1000,
        "epochs": 1,
    }
    assert pace(cost) == Pace(0.01, 0.4)
    assert pace(cost).epoch_seconds(60_000) == pytest.approx(600.4)
    assert pace({"train_seconds": 10.0, "examples": 1000, "epochs": 2}) == Pace(0.005)
    assert pace({}) is None


def test_an_epochs_start_leaves_the_first_epochs_tracing_out(monkeypatch):
    """Three epochs of 4 steps: the first starts in 3 s (tracing the step), the others in
    0.2 s; the steady steps take 1 s an epoch, two cores busy. Retraining for 60 epochs pays
    the 3 s once."""
    from cnnforge.modeling import hypermodel

    ticks = []
    for start in (3.0, 0.2, 0.2):
        ticks += [0.0, start, 0.5, 0.5]  # (increments) begin, the first step, two more
    clock_times, cpu_times = iter(np.cumsum(ticks)), iter(2 * np.cumsum(ticks))
    fake_time = types.SimpleNamespace(
        perf_counter=lambda: next(clock_times), process_time=lambda: next(cpu_times)
    )
    monkeypatch.setattr(hypermodel, "time", fake_time)
    clock = hypermodel.TrainingClock()
    clock.set_params({"steps": 4})
    for epoch in range(3):
        clock.on_epoch_begin(epoch)
        for step in (0, 1, 3):  # steps_per_execution: the last call reports step 4
            clock.on_train_batch_end(step)
        clock.on_epoch_end(epoch)
    assert clock.epoch_start() == pytest.approx(0.2)
    assert clock.steady_seconds == pytest.approx(3.0) and clock.steady_steps == 9
    assert clock.steady_cpu_seconds == pytest.approx(6.0)


@pytest.mark.slow
def test_a_search_stops_in_time_and_still_trains_the_winner_again(small_npz, tmp_path):
    budget = 25.0
    start = time.perf_counter()
    result = search(
        SearchConfig(
            data=str(small_npz),
            run_dir=tmp_path / "r",
            max_trials=200,
            epochs=3,
            patience=0,
            time_budget=budget,
        )
    )
    elapsed = time.perf_counter() - start
    assert elapsed < budget + 10  # one batch, one validation pass and saving past the deadline
    assert 1 <= len(result.trials) < 200
    assert result.final_training is not None and result.final_training.epochs >= 1
    summary = json.loads((tmp_path / "r" / "search.json").read_text())
    # train + validation less the calibration slice
    final = summary["final_training"]
    assert final["examples"] + final["calibration_images"] == 400
    # a probe would take a large share of a budget this small: a nominal pace plans it
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["basis"] == "nominal"


def test_the_final_training_uses_train_and_validation_for_the_epochs_found(finished_run):
    final = finished_run.final_training
    assert final.examples + final.calibration_images == 400  # the slice: calibration
    assert final.epochs == final.epochs_found
    assert final.epochs_found == finished_run.best_trial.best_epoch
    rows = list(csv.DictReader((finished_run.run_dir / "trials.csv").open()))
    assert all(1 <= int(r["best_epoch"]) <= int(r["epochs"]) for r in rows)
    # the final training's pace and busy cores over its steady steps, as a trial's
    assert final.train_gflops > 0 and 0.05 < final.cores_busy <= (os.cpu_count() or 1) + 0.25
    assert all(0.05 < float(r["cores_busy"]) <= (os.cpu_count() or 1) + 0.25 for r in rows)


def _one_trial(small_npz, run_dir, **settings):
    """A one-trial, one-epoch search on the small data with ``settings``."""
    config = SearchConfig(
        data=str(small_npz), run_dir=run_dir, max_trials=1, epochs=1, patience=0, **settings
    )
    return search(config)


@pytest.mark.slow
def test_without_retraining_the_best_model_is_the_trials_own(small_npz, tmp_path):
    result = _one_trial(small_npz, tmp_path / "r", retrain=False)
    assert result.final_training is None
    trial_dir = tmp_path / "r" / "tuner" / "trial_0"
    best = keras.models.load_model(result.best_model)
    reference = keras.models.clone_model(best)
    reference.load_weights(str(trial_dir / "checkpoint.weights.h5"))
    for ours, theirs in zip(best.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_trials_train_on_their_share_of_the_data(small_npz, tmp_path):
    result = _one_trial(small_npz, tmp_path / "r", search_fraction=0.5)
    cost = json.loads((tmp_path / "r" / "tuner" / "trial_0" / "cnnforge_cost.json").read_text())
    assert abs(cost["examples"] - 180) <= 2  # half of the 360 training images, per class
    final = result.final_training
    assert final.examples + final.calibration_images == 400


def _trials(small_npz, run_dir, seed):
    config = SearchConfig(
        data=str(small_npz),
        run_dir=run_dir,
        tuner="random",  # the seed draws the trials (auto's first ones are the priors)
        max_trials=2,  # the baseline, then a draw the seed decides
        epochs=1,
        patience=0,
        fix={"conv_blocks": "1"},  # small draws: the seed decides the rest
        seed=seed,
        deterministic=True,
        retrain=False,
    )
    return [(t.hyperparameters, t.score) for t in search(config).trials]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_trials_and_scores(small_npz, tmp_path):
    from tensorflow.python.framework import config as tf_config

    first = _trials(small_npz, tmp_path / "a", seed=7)
    assert not tf_config.is_op_determinism_enabled()  # switched off again after the search
    again = _trials(small_npz, tmp_path / "b", seed=7)
    other = _trials(small_npz, tmp_path / "c", seed=8)
    assert first == again
    assert [hp for hp, _ in first][1:] != [hp for hp, _ in other][1:]  # trial 0 is the baseline


@pytest.mark.slow
def test_mixed_precision_trains_and_exports_a_float32_model(small_npz, tmp_path):
    from cnnforge.conversion.export import export

    result = _one_trial(small_npz, tmp_path / "r", precision="mixed")
    assert keras.config.dtype_policy().name == "float32"  # the policy does not leak
    best = keras.models.load_model(result.best_model)
    assert {w.dtype for w in best.weights} == {"float32"}
    assert best.dtype_policy.name == "float32"
    exported = export(tmp_path / "r")
    assert exported.parity.passed


def test_past_the_deadline_a_running_trial_is_answered_stopped(tmp_path):
    """A distributed worker cannot see the chief's clock: its epoch report is answered STOPPED
    once the deadline has passed, and the tuner stops that trial's training."""
    import keras_tuner

    from cnnforge.tuning.oracles import ORACLES
    from cnnforge.tuning.tuners import RecordingTuner

    hps = keras_tuner.HyperParameters()
    hps.Int("units", 1, 4)
    oracle = ORACLES["random"](
        objective=keras_tuner.Objective("val_accuracy", "max"), hyperparameters=hps, max_trials=3
    )
    oracle._set_project_dir(str(tmp_path), "tuner")
    trial = oracle.create_trial("worker-1")
    running = keras_tuner.engine.trial.TrialStatus.RUNNING
    assert oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5}, step=0).status == running
    oracle.deadline = time.time() - 1
    answer = oracle.update_trial(trial.trial_id, {"val_accuracy": 0.6}, step=1)
    assert answer.status == keras_tuner.engine.trial.TrialStatus.STOPPED
    assert oracle.trials[trial.trial_id].status == running  # the oracle's own record unchanged

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    tuner = RecordingTuner.__new__(RecordingTuner)  # only on_epoch_end's answer handling
    tuner.oracle = oracle
    RecordingTuner.on_epoch_end(tuner, trial, model, 1, {"val_accuracy": 0.7})
    assert model.stop_training


def test_patience_leaves_a_scheduled_learning_rate_alone():
    from cnnforge.tuning.tuners import PatienceUnlessScheduled

    def stopped(rate) -> bool:
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
        patience = PatienceUnlessScheduled("val_loss", patience=1)
        patience.set_model(model)
        patience.on_train_begin()
        for epoch, loss in enumerate([1.0, 2.0, 3.0]):  # worse and worse
            patience.on_epoch_end(epoch, {"val_loss": loss})
        return bool(model.stop_training)

    assert stopped(1e-3)
    assert not stopped(keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100))


def test_a_budget_too_short_for_one_trial_is_refused_with_the_smallest_that_works(tmp_path):
    """30 s on the bundled data planned no trial and ended with an empty trials.csv: it is
    refused up front, naming the smallest budget that holds one trial and the final training."""
    run_dir = tmp_path / "r"
    result = CliRunner().invoke(cli, ["search", "--time-budget", "30s", "--run-dir", str(run_dir)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "time budget 30s is too short" in lines[0] and "--time-budget" in lines[0], lines[0]
    smallest = int(lines[0].split("give --time-budget ")[1].split("s")[0])
    assert 30 < smallest < 600
    assert not run_dir.exists()  # refused before anything is written


def test_the_final_trainings_reserve_counts_the_images_it_trains_on_not_the_calibration_slice():
    """The final training leaves its calibration slice out: the budget reserves time for the
    images it trains on (9,000 of 10,000 here), not for all of train+validation."""
    from cnnforge.data.dataset import Dataset, DataSpec
    from cnnforge.tuning.search import _time_budget

    labels = np.arange(10_000) % 10
    images = np.zeros((10_000, 8, 8, 1), np.uint8)
    spec = DataSpec("made", (8, 8, 1), tuple(str(i) for i in range(10)))
    dataset = Dataset(
        spec, images[:8000], labels[:8000], images[8000:], labels[8000:], images[:10], labels[:10]
    )
    config = SearchConfig(time_budget=600, seed=3)
    budget = _time_budget(config, dataset, time.time(), 0.0, None)
    assert budget.final_examples == 9_000
    assert (
        _time_budget(
            SearchConfig(time_budget=600, retrain=False), dataset, None, 0.0, None
        ).final_examples
        == 0
    )


@pytest.mark.parametrize(
    "best_epoch, epochs, most",
    [
        (7, 7, 54),  # best at its last epoch: still improving
        (6, 7, 54),  # a dip at the last epoch of a cosine run (the default run on 06626e6)
        (3, 12, 36),  # best a quarter in: not improving, the cap of optimizer steps only
    ],
)
def test_a_winner_still_improving_in_its_last_quarter_may_train_longer(best_epoch, epochs, most):
    """Where the search left time over, a winner whose best epoch came in the last quarter of
    its schedule may take 1.5x the epochs found (36 here, the cap of 2,000 steps on 7,200
    images): the default run on 06626e6 ended 80 s inside its 4m30s budget because its winner's
    best was epoch 6 of 7, and trained 36 epochs where the same prior had trained 51-54."""
    from cnnforge.tuning.final_training import _most_final_epochs
    from cnnforge.tuning.records import TrialRecord

    record = TrialRecord("4", "COMPLETED", 0.9, {}, {}, epochs=epochs, best_epoch=best_epoch)
    assert _most_final_epochs(36, record, examples=7200, batch_size=128) == most
