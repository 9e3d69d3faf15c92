"""Latency-aware search: candidates measured before training, budgets, the Pareto front,
listing trials and exporting any of them."""

from __future__ import annotations

import csv
import json

import pytest

from cnnforge.core.objectives import TrialPoint, pareto_front, sorted_trials
from cnnforge.tuning.search import SearchConfig, search, trial_model

# One conv block and a flatten head: the dense layer's parameters grow with filters_0 × units.
PINNED = {
    "conv_blocks": "1",
    "kernel_size": "3",
    "pooling": "max",
    "pool_after_last_block": "false",
    "first_block_padding": "valid",
    "batch_norm": "false",
    "head": "flatten",
    "dense_layers": "1",
    "dropout": "0.0",
    "learning_rate": "0.001",
    "filters_1": "16",
    "filters_2": "16",
    "filters_3": "16",
    "dense_units_1": "32",
    "lr_schedule": "constant",
    "weight_decay": "0.0",
    "label_smoothing": "0.0",
    "augment": "none",
    "flip": "false",
}
# filters_0=16, units=32: 26·26·16·32 ≈ 346k parameters; every other pair has over 1M.
MAX_PARAMS = 1_000_000


@pytest.fixture(scope="module")
def budget_run(small_npz, tmp_path_factory):
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path_factory.mktemp("budget") / "run",
        tuner="grid",
        max_trials=4,
        epochs=1,
        patience=0,
        fix=PINNED,
        space={"filters_0": ["16", "128"], "dense_units_0": ["32", "256"]},
        max_params=MAX_PARAMS,
    )
    return search(config)


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "trials.csv").open()))


@pytest.mark.slow
def test_candidates_over_budget_are_measured_but_not_trained(budget_run):
    run_dir = budget_run.run_dir
    by_status = {}
    for record in budget_run.trials:
        by_status.setdefault(record.status, []).append(record)
    # Three refusals in a row would have stopped KerasTuner ("consecutive failures"): they are
    # not failures, and the grid ran to its end.
    assert len(by_status["COMPLETED"]) == 1 and len(by_status["OVER_BUDGET"]) == 3
    assert budget_run.best_trial.status == "COMPLETED"
    for record in budget_run.trials:
        assert record.latency_ms > 0 and record.flops > 0 and record.size_mb > 0
        trial_dir = run_dir / "tuner" / f"trial_{record.trial_id}"
        cost = json.loads((trial_dir / "cnnforge_cost.json").read_text())
        if record.status == "OVER_BUDGET":
            assert record.params > MAX_PARAMS and record.score is None
            assert record.message.startswith(f"over budget: params {record.params} > ")
            assert "epochs" not in cost and "history" not in cost
            assert not (trial_dir / "checkpoint.weights.h5").exists()
        else:
            assert record.params <= MAX_PARAMS and cost["epochs"] == 1
    rows = _rows(run_dir)
    assert {r["status"] for r in rows} == {"COMPLETED", "OVER_BUDGET"}
    assert all(float(r["latency_ms"]) > 0 and float(r["measure_s"]) > 0 for r in rows)
    assert [r["pareto"] for r in rows if r["status"] == "COMPLETED"] == ["1"]
    assert {r["pareto"] for r in rows if r["status"] == "OVER_BUDGET"} == {"0"}


@pytest.mark.slow
def test_a_budget_nothing_meets_is_a_clear_error(small_npz, tmp_path):
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "r",
        max_trials=2,
        epochs=1,
        patience=0,
        fix=PINNED,
        max_size_mb=0.001,
    )
    with pytest.raises(Exception, match=r"2 over budget: loosen the --max-\* limits"):
        search(config)
    assert [r["status"] for r in _rows(tmp_path / "r")] == ["OVER_BUDGET", "OVER_BUDGET"]


def test_pareto_front_over_accuracy_latency_and_size():
    points = [
        TrialPoint("a", "COMPLETED", 0.80, 1.0, 5.0),
        TrialPoint("b", "COMPLETED", 0.85, 3.0, 5.0),
        TrialPoint("c", "COMPLETED", 0.70, 2.0, 1.0),  # slower, worse than a, but smallest
        TrialPoint("d", "COMPLETED", 0.90, 5.0, 9.0),
        TrialPoint("e", "COMPLETED", 0.85, 4.0, 6.0),  # b is as good, faster and smaller
        TrialPoint("f", "COMPLETED", 0.85, 3.0, 5.0),  # equal to b: the first is kept
        TrialPoint("g", "OVER_BUDGET", None, 0.5, 0.5),
    ]
    front = pareto_front(points, "val_accuracy", with_size=True)
    assert [p.trial_id for p in front] == ["a", "c", "b", "d"]
    assert [p.trial_id for p in pareto_front(points, "val_accuracy")] == ["a", "b", "d"]


def test_trials_sort_by_any_column():
    rows = [
        {"trial_id": "0", "score": "0.8", "latency_ms": "2.0", "pareto": "1"},
        {"trial_id": "1", "score": "", "latency_ms": "0.5", "pareto": "0"},
        {"trial_id": "2", "score": "0.9", "latency_ms": "3.0", "pareto": "1"},
    ]
    ids = lambda rs: [r["trial_id"] for r in rs]  # noqa: E731
    assert ids(sorted_trials(rows, "val_accuracy")) == ["2", "0", "1"]
    assert ids(sorted_trials(rows, "val_loss")) == ["0", "2", "1"]
    assert ids(sorted_trials(rows, "val_accuracy", "latency_ms")) == ["1", "0", "2"]
    assert ids(sorted_trials(rows, "val_accuracy", "pareto")) == ["0", "2", "1"]
    with pytest.raises(Exception, match="no column 'speed'; choose from trial_id"):
        sorted_trials(rows, "val_accuracy", "speed")


@pytest.mark.slow
def test_any_trial_exports_from_its_checkpoint_or_retrained(budget_run, small_npz):
    from cnnforge.conversion.export import export
    from cnnforge.modeling.keras_io import load_keras_model

    run_dir = budget_run.run_dir
    refused = next(r for r in budget_run.trials if r.status == "OVER_BUDGET")
    path = trial_model(run_dir, refused.trial_id)  # no checkpoint: trained again
    assert path == run_dir / f"trial-{refused.trial_id}.keras"
    assert load_keras_model(path).count_params() == refused.params
    result = export(path, run_dir / "model-trial.onnx")
    assert result.parity.passed and (run_dir / "model-trial.onnx").is_file()
    with pytest.raises(Exception, match="has no trial '99'; its trials: 0, 1, 2, 3"):
        trial_model(run_dir, "99")


@pytest.mark.slow
def test_cli_lists_trials_and_exports_a_non_best_one(budget_run):
    from click.testing import CliRunner

    from cnnforge.cli import cli

    run_dir = str(budget_run.run_dir)
    wide = {"COLUMNS": "200"}
    listed = CliRunner().invoke(cli, ["trials", run_dir, "--sort", "latency_ms"], env=wide)
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("OVER_BUDGET") == 3 and "over budget: params" in listed.output
    front = CliRunner().invoke(cli, ["trials", run_dir, "--front"], env=wide)
    assert "1 trial(s)" in front.output and "OVER_BUDGET" not in front.output
    bad = CliRunner().invoke(cli, ["trials", run_dir, "--sort", "speed"])
    assert bad.exit_code == 1 and "no column 'speed'" in bad.output
    # The best trial is 0; trial 1 was refused, so it has no checkpoint and is trained again.
    exported = CliRunner().invoke(cli, ["export", run_dir, "--trial", "1"])
    assert exported.exit_code == 0, exported.output
    assert (budget_run.run_dir / "model-trial-1.onnx").is_file()
    assert (budget_run.run_dir / "trial-1.keras").is_file()


def test_budget_options_reach_the_search_config():
    from cnnforge.cli.options import search_config, search_options

    captured = {}

    @search_options(
        {
            "data": "d",
            "arch": "simple_cnn",
            "run_dir": "r",
            "tuner": "random",
            "max_trials": 1,
            "epochs": 1,
            "patience": 0,
        }
    )
    def command(**options):
        captured.update(options)

    import click.testing

    click.testing.CliRunner().invoke(
        click.command()(command),
        [
            "--max-latency-ms",
            "2.5",
            "--max-params",
            "1000",
            "--max-flops",
            "10",
            "--max-size-mb",
            "0.5",
            "--latency-batch-size",
            "8",
        ],
    )
    config = search_config(captured)
    assert (config.max_latency_ms, config.max_params, config.max_flops, config.max_size_mb) == (
        2.5,
        1000,
        10,
        0.5,
    )
    assert (config.latency_batch_size, config.latency_provider) == (8, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["random", "bayesian", "hyperband"])
def test_every_tuner_moves_past_refused_candidates(tuner, small_npz, tmp_path):
    # Only filters_0=128 with 256 units (about 22M parameters) is over 5M.
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / tuner,
        tuner=tuner,
        max_trials=4,
        epochs=2 if tuner == "hyperband" else 1,
        patience=0,
        fix=PINNED,
        space={"filters_0": ["16", "128"], "dense_units_0": ["32", "256"]},
        max_params=5_000_000,
    )
    result = search(config)
    assert result.best_trial.status == "COMPLETED"
    for record in result.trials:
        big = (record.hyperparameters["filters_0"], record.hyperparameters["dense_units_0"])
        assert record.status == ("OVER_BUDGET" if big == (128, 256) else "COMPLETED")
