"""Crash-safe resume: a search killed at any moment ends, when run again, with exactly the
requested trials, none lost, none duplicated, the interrupted one re-run once."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from search_commands import small_search

from cnnforge.core.errors import CnnforgeError
from cnnforge.tuning.tuners import _save_json_atomically


def search_command(
    data: Path, run_dir: Path, tuner: str, trials: int = 3, epochs: int = 4
) -> list[str]:
    return small_search(
        data,
        run_dir,
        *("--tuner", tuner, "--max-trials", str(trials), "--epochs", str(epochs)),
        *("--fix", "learning_rate=0.001", "--fix", "dropout=0.0"),
    )


def finished_trials(run_dir: Path) -> int:
    path = run_dir / "trials.csv"
    return len(list(csv.DictReader(path.open()))) if path.exists() else 0


def start_and_interrupt(command: list[str], run_dir: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``command``; once one trial has finished and the next is under way, send ``sig``."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell without job control starts background jobs with SIGINT
        # ignored, and Python then installs no handler for it (seen in a CI run started with &)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not _next_trial_running(run_dir) and proc.poll() is None:
        assert time.monotonic() < deadline, "no second trial started within 240 s"
        time.sleep(0.05)
    time.sleep(0.5)  # inside the next trial's training (a small trial here lasts 2-3 s)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _next_trial_running(run_dir: Path) -> bool:
    """One trial finished (its row in trials.csv) and another one RUNNING in its trial.json."""
    try:
        states = trial_states(run_dir)
    except json.JSONDecodeError:  # a trial.json being written
        return False
    finished = finished_trials(run_dir)
    return finished >= 1 and len(states) > finished and "RUNNING" in states.values()


def trial_states(run_dir: Path) -> dict[str, str]:
    return {
        path.parent.name: json.loads(path.read_text())["status"]
        for path in (run_dir / "tuner").glob("trial_*/trial.json")
    }


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["auto", "random", "bayesian", "grid", "hyperband"])
def test_sigkill_mid_trial_then_rerun_completes_every_trial_once(tuner, small_npz, tmp_path):
    run_dir = tmp_path / "run"
    command = search_command(small_npz, run_dir, tuner)
    killed = start_and_interrupt(command, run_dir, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    interrupted = {t for t, status in trial_states(run_dir).items() if status == "RUNNING"}
    assert len(interrupted) == 1, trial_states(run_dir)

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    states = trial_states(run_dir)
    assert set(states.values()) == {"COMPLETED"}, states
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(states)
    if tuner != "hyperband":  # Hyperband's trial count comes from its brackets, not max-trials
        assert len(ids) == 3
    assert interrupted <= {f"trial_{i}" for i in ids}
    assert (run_dir / "best.keras").is_file()


def trial_scores(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Each trial's score and hyperparameters, as trials.csv has them."""
    rows = csv.DictReader((run_dir / "trials.csv").open())
    return {
        r["trial_id"]: (r["score"], json.dumps({k: v for k, v in r.items() if k[:3] == "hp_"}))
        for r in rows
    }


# --epochs 4: a halving schedule with few epochs a trial. A budget plans no paired trials on
# 400 images (the final training plans 60 epochs, and pairs need a top rung of half that);
# counts do (the final training as long as the top rung), so both are run.
DETERMINISTIC_PLANS = {
    "budget": ("--time-budget", "2m", "--epochs", "4"),
    "counts with paired trials": ("--max-trials", "6", "--epochs", "4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("plan_options", DETERMINISTIC_PLANS.values(), ids=DETERMINISTIC_PLANS)
def test_a_deterministic_auto_search_repeats_itself_even_killed_and_resumed(
    plan_options, small_npz, tmp_path
):
    """Goal: with --seed and --deterministic, the same trials and the same final model; the
    plan comes from FLOPs, not from a clock, so a budget plans the same search every time;
    paired trials, which decide on the winner's score, repeat too."""
    import keras
    import numpy as np

    def command(run_dir: Path) -> list[str]:
        options = ("--deterministic", "--seed", "3", *plan_options)
        return small_search(small_npz, run_dir, *options)

    whole = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    killed = start_and_interrupt(command(tmp_path / "b"), tmp_path / "b", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(command(tmp_path / "b"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr

    plans = [json.loads((tmp_path / run / "plan.json").read_text()) for run in "ab"]
    assert plans[0] == plans[1] and len(plans[0]["rungs"]) > 1
    assert plans[0]["basis"] == ("flops" if "--time-budget" in plan_options else "counts")
    scores = trial_scores(tmp_path / "a")
    assert scores == trial_scores(tmp_path / "b")
    if plans[0]["paired"]:  # the paired trials ran, at the rung above the halving's last
        top = str(len(plans[0]["rungs"]))
        paired = [hp for _, hp in scores.values() if json.loads(hp)["hp_tuner/rung"] == top]
        assert len(paired) == plans[0]["paired"]
    assert plans[0]["paired"] or "--time-budget" in plan_options
    models = [keras.models.load_model(tmp_path / run / "best.keras") for run in "ab"]
    for first, second in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_sigint_saves_state_says_how_to_resume_and_exits_non_zero(small_npz, tmp_path):
    run_dir = tmp_path / "run"
    command = search_command(small_npz, run_dir, "random", trials=2, epochs=12)
    stopped = start_and_interrupt(command, run_dir, signal.SIGINT)
    assert stopped.returncode == 130
    assert "run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert finished_trials(run_dir) == 2


def test_kerastuner_state_writes_are_atomic(tmp_path, monkeypatch):
    state = tmp_path / "oracle.json"
    _save_json_atomically(str(state), {"trials": 1})
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left"))
    )
    with pytest.raises(CnnforgeError, match="cannot write"):
        _save_json_atomically(str(state), {"trials": 2})
    assert json.loads(state.read_text()) == {"trials": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["oracle.json"]
