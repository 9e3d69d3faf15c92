"""A real KerasTuner search on small real data: the run directory, resume, pins and narrowing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.tuning.search import SearchConfig, search


def test_run_directory_holds_what_a_user_needs(finished_run):
    run_dir = finished_run.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["search"]["arch"] == "simple_cnn" and config["search"]["seed"] == 0
    assert {"tensorflow", "keras", "keras_tuner", "cnnforge"} <= set(config["versions"])
    assert config["data_spec"]["input_shape"] == [28, 28, 1]
    assert (run_dir / "tuner" / "oracle.json").is_file()

    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == ["0", "1"]
    for row in rows:
        assert row["status"] == "COMPLETED"
        assert int(row["params"]) > 1000 and float(row["duration_s"]) > 0
        assert 0 <= float(row["val_accuracy"]) <= 1 and row["score"] == row["val_accuracy"]
        assert row["hp_conv_blocks"] and row["hp_learning_rate"]

    best = keras.models.load_model(run_dir / "best.keras")
    assert best.count_params() == finished_run.best_trial.params
    assert finished_run.best_trial.score == max(float(r["score"]) for r in rows)


def test_first_trial_is_the_default_model(finished_run):
    first = finished_run.trials[0].hyperparameters
    assert first["conv_blocks"] == 3 and first["filters_0"] == 32 and first["filters_1"] == 64
    assert (
        first["pooling"] == "max"
        and first["dense_units_0"] == 64
        and first["learning_rate"] == 1e-3
    )


@pytest.mark.slow
def test_rerun_resumes_and_runs_only_the_missing_trials(small_npz, tmp_path):
    config = SearchConfig(
        data=str(small_npz), run_dir=tmp_path / "r", max_trials=1, epochs=1, patience=0
    )
    first = search(config)
    assert len(first.trials) == 1
    config.max_trials = 2
    second = search(config)
    assert [t.trial_id for t in second.trials] == ["0", "1"]
    assert second.trials[0].duration_s == first.trials[0].duration_s  # trial 0 was not re-run


def test_a_run_directory_of_another_search_is_refused(small_npz, finished_run):
    config = SearchConfig(
        data=str(small_npz), run_dir=finished_run.run_dir, arch="resnet", max_trials=2
    )
    with pytest.raises(CnnforgeError, match=r"holds a different search \(differs in arch\b"):
        search(config)


@pytest.mark.parametrize("change", [{"latency_batch_size": 8}, {"batch_size": 64}, {"epochs": 3}])
def test_resuming_with_another_latency_batch_or_training_length_is_refused(finished_run, change):
    saved = json.loads((finished_run.run_dir / "config.json").read_text())["search"]
    (name,) = change
    with pytest.raises(CnnforgeError, match=rf"holds a different search \(differs in {name}\)"):
        search(SearchConfig.from_json(saved, **change))


def test_the_latency_provider_is_part_of_a_search_identity(finished_run):
    """CPU and GPU latencies must never share one Pareto front (the provider is checked to be
    installed before the run directory is, so this compares identities)."""
    saved = json.loads((finished_run.run_dir / "config.json").read_text())["search"]
    resumed = SearchConfig.from_json({**saved, "from_a_newer_version": 1})
    assert resumed.identity() == {k: saved[k] for k in resumed.identity()}
    on_gpu = SearchConfig.from_json(saved, latency_provider="cuda")
    assert on_gpu.identity() == {**resumed.identity(), "latency_provider": "cuda"}


def test_fix_values_of_any_type_are_kept_as_their_text():
    config = SearchConfig(fix={"batch_norm": True, "filters_0": 32}, space={"lr": [0.001, 0.01]})
    assert config.fix == {"batch_norm": "True", "filters_0": "32"}
    assert config.space == {"lr": ["0.001", "0.01"]}
    assert SearchConfig(space={"lr": "0.001, 0.01"}).space == {"lr": ["0.001", "0.01"]}


@pytest.mark.slow
def test_fix_and_space_constrain_every_trial(small_npz, tmp_path):
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "r",
        max_trials=3,
        epochs=1,
        patience=0,
        fix={"conv_blocks": "2", "batch_norm": "true"},
        space={"filters_0": ["16", "128"]},
    )
    result = search(config)
    assert len(result.trials) == 3
    for trial in result.trials:
        assert trial.hyperparameters["conv_blocks"] == 2
        assert trial.hyperparameters["batch_norm"] is True
        assert trial.hyperparameters["filters_0"] in (16, 128)


def test_unknown_or_mistyped_hyperparameters_are_clear_errors(small_npz, tmp_path):
    config = SearchConfig(data=str(small_npz), run_dir=tmp_path / "a", fix={"conv_block": "2"})
    with pytest.raises(
        CnnforgeError, match="no hyperparameter 'conv_block'; did you mean conv_blocks"
    ):
        search(config)
    config = SearchConfig(data=str(small_npz), run_dir=tmp_path / "b", fix={"conv_blocks": "two"})
    with pytest.raises(CnnforgeError, match="'conv_blocks' takes int values, got 'two'"):
        search(config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband", "grid"])
def test_every_tuner_runs(tuner, small_npz, tmp_path):
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / tuner,
        tuner=tuner,
        max_trials=2,
        epochs=2,
        patience=0,
        fix={"learning_rate": "0.001", "dropout": "0.0", "conv_blocks": "2"},
        space={"kernel_size": ["3"], "filters_0": ["16", "32"]},
    )
    result = search(config)
    completed = [t for t in result.trials if t.status == "COMPLETED"]
    assert completed and (tmp_path / tuner / "best.keras").is_file()
    first = result.trials[0].hyperparameters
    assert first["filters_0"] == 16 and first["augment"] == "none"  # the defaults (narrowed)


@pytest.mark.slow
def test_hyperband_counts_a_promoted_trials_epochs_from_scratch(small_npz, tmp_path):
    result = search(
        SearchConfig(
            data=str(small_npz),
            run_dir=tmp_path / "hb",
            tuner="hyperband",
            epochs=3,
            patience=0,
            retrain=False,
            fix={"conv_blocks": "2"},
        )
    )
    promoted = [t for t in result.trials if t.hyperparameters.get("tuner/initial_epoch")]
    assert promoted
    for trial in promoted:
        start = trial.hyperparameters["tuner/initial_epoch"]
        assert trial.epochs == trial.hyperparameters["tuner/epochs"] - start
        assert start < trial.best_epoch <= trial.hyperparameters["tuner/epochs"]


@pytest.mark.slow
def test_mirrored_strategy_trains_a_trial(small_npz, tmp_path):
    """On a machine without GPUs MirroredStrategy uses the CPU: the code path a GPU box runs."""
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "m",
        max_trials=1,
        epochs=1,
        patience=0,
        strategy="mirrored",
    )
    result = search(config)
    assert result.trials[0].status == "COMPLETED" and result.best_model.is_file()


@pytest.mark.parametrize(
    "change", [{"precision": "float32"}, {"patience": 1}, {"deterministic": True}]
)
def test_resuming_with_another_precision_patience_or_determinism_is_refused(finished_run, change):
    saved = json.loads((finished_run.run_dir / "config.json").read_text())["search"]
    (name,) = change
    with pytest.raises(CnnforgeError, match=rf"holds a different search \(differs in {name}\)"):
        search(SearchConfig.from_json(saved, **change))


def _class_folder(root: Path, name: str, count: int = 12) -> None:
    rng = np.random.default_rng(len(name))
    (root / name).mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(root / name / f"{i}.png")


@pytest.mark.slow
def test_resuming_on_changed_data_is_refused_naming_what_changed(tmp_path):
    """The same command on a folder that gained a class, or whose images changed, would rank
    trials of two datasets together: the run directory refuses it."""
    from click.testing import CliRunner

    from cnnforge.cli import cli

    data, run_dir = tmp_path / "photos", tmp_path / "run"
    for name in ("ants", "bees"):
        _class_folder(data, name)
    command = ["search", "--data", f"dir:{data}", "--run-dir", str(run_dir), "--tuner", "random"]
    command += ["--max-trials", "1", "--epochs", "1", "--patience", "0", "--no-retrain"]
    first = CliRunner().invoke(cli, command)
    assert first.exit_code == 0, first.output

    _class_folder(data, "wasps")
    added = CliRunner().invoke(cli, command)
    lines = [line for line in added.stderr.splitlines() if line.strip()]
    assert added.exit_code == 1 and len(lines) == 1, added.output
    assert "differs in data (class names, split sizes, content)" in lines[0], lines[0]

    shutil.rmtree(data / "wasps")
    Image.fromarray(np.zeros((12, 12), np.uint8), "L").save(data / "ants" / "0.png")
    edited = CliRunner().invoke(cli, command)
    assert edited.exit_code == 1 and "differs in data (content)" in edited.stderr, edited.output


@pytest.mark.slow
def test_a_run_directory_without_a_data_fingerprint_resumes_with_a_warning(finished_run, tmp_path):
    """Run directories of an older cnnforge recorded no fingerprint: their data is taken to be
    the same (with a warning), and the fingerprint is recorded from then on."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    record = json.loads((run_dir / "data.json").read_text())
    record.pop("fingerprint", None)
    (run_dir / "data.json").write_text(json.dumps(record))
    saved = json.loads((run_dir / "config.json").read_text())["search"]
    with pytest.warns(CnnforgeWarning, match="no fingerprint of its data"):
        search(SearchConfig.from_json(saved, run_dir=run_dir))
    assert json.loads((run_dir / "data.json").read_text())["fingerprint"]["splits"]


def test_a_search_keeps_the_objects_before_it_out_of_the_collectors_sight(
    small_npz, tmp_path, monkeypatch
):
    """Keras and KerasTuner collect garbage two or three times a trial; each walk of what the
    imports made took ~0.4 s, a fifth of a small search. They are frozen while it runs."""
    import gc

    from cnnforge.tuning.tuners import RecordingTuner

    frozen_in_trials = []
    measure = RecordingTuner.measure

    def measure_and_look(self, hp):
        frozen_in_trials.append(gc.get_freeze_count())
        return measure(self, hp)

    monkeypatch.setattr(RecordingTuner, "measure", measure_and_look)
    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "r",
        tuner="random",
        max_trials=1,
        epochs=1,
        patience=0,
        retrain=False,
        fix={"conv_blocks": "1"},
        track=[],
    )
    gc.unfreeze()  # the suite froze its imports (tests/conftest.py); a user's process has not
    try:
        search(config)
        frozen_after = gc.get_freeze_count()
    finally:
        gc.collect()
        gc.freeze()
    assert frozen_in_trials and frozen_in_trials[0] > 100_000  # TensorFlow's objects at least
    assert frozen_after == 0  # given back to the collector
