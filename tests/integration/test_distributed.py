"""Distributed search on KerasTuner's chief/worker engine: a chief and two workers as separate
processes on loopback, sharing one run directory."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from search_commands import small_search

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data: Path, run_dir: Path, *role: str, tuner: str = "auto") -> list[str]:
    return small_search(
        data, run_dir, "--tuner", tuner, "--max-trials", "4", "--epochs", "3", *role
    )


def worker(
    data: Path, run_dir: Path, address: str, worker_id: str, tuner: str = "auto"
) -> list[str]:
    role = ("--distributed", "worker", "--chief", address, "--worker-id", worker_id)
    return command(data, run_dir, *role, tuner=tuner)


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "trials.csv").open()))


def test_chief_and_two_workers_complete_every_trial_once(small_npz, tmp_path):
    run_dir, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    chief_role = ("--distributed", "chief", "--listen", address, "--track", "tensorboard,mlflow")
    # random: four trials of three epochs each (auto's rungs would wait on one another)
    chief = start(command(small_npz, run_dir, *chief_role, tuner="random"))
    names = ("worker1", "worker2")
    workers = [start(worker(small_npz, run_dir, address, w, tuner="random")) for w in names]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]
    out, err = chief.communicate(timeout=120)
    assert chief.returncode == 0, err

    trials = rows(run_dir)
    assert sorted(t["trial_id"] for t in trials) == ["0", "1", "2", "3"]
    assert {t["status"] for t in trials} == {"COMPLETED"}
    ran = [int(o.split("ran ")[1].split(" trial")[0]) for o, _ in outputs]
    assert sum(ran) == 4, outputs
    assert (run_dir / "best.keras").is_file()
    assert "best model:" in out
    assert_logged_by_the_chief_only(run_dir)
    # the workers (no --track) left the chief's settings alone: a resume keeps its trackers
    saved = json.loads((run_dir / "config.json").read_text())["search"]
    assert saved["distributed"] == "chief" and saved["track"] == ["tensorboard", "mlflow"]


def assert_logged_by_the_chief_only(run_dir: Path) -> None:
    """The chief logs every trial, its epochs read from the trial's cost file; the workers log
    nothing (one run per trial, no second search run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    ids = json.loads((run_dir / "mlflow.json").read_text())
    runs = client.search_runs([ids["experiment_id"]])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == ids["parent"]]
    assert len(runs) == 5 and len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "tensorboard").glob("trial_*")) == [
        f"trial_{i}" for i in range(4)
    ]


def test_a_worker_killed_mid_trial_does_not_stall_the_search(small_npz, tmp_path):
    """The auto search (three candidates for an epoch, the best for three): the survivor waits
    while the dead worker's trial holds the first rung, then runs it and the rest."""
    run_dir, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    # the lease outlasts a live worker's longest silence (measuring, building and the first
    # epoch of a trial: 7 s was seen on a loaded machine, and a lease of 5 s then gave its
    # trial to the next worker too); the dead worker is let go after it
    chief_cmd = command(
        small_npz, run_dir, "--distributed", "chief", "--listen", address, "--worker-timeout", "20"
    )
    chief = start(chief_cmd)
    doomed = start(worker(small_npz, run_dir, address, "doomed"))
    deadline = time.monotonic() + 300
    while not list((run_dir / "tuner").glob("trial_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate()
    survivor = start(worker(small_npz, run_dir, address, "survivor"))
    out, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    assert "ran 4 trial(s)" in out
    chief_out, chief_err = chief.communicate(timeout=120)
    assert chief.returncode == 0, chief_err
    assert sorted(t["status"] for t in rows(run_dir)) == ["COMPLETED"] * 4


def test_distributed_flags_are_checked():
    from click.testing import CliRunner

    from cnnforge.cli import cli

    for args, message in [
        (["--distributed", "chief"], "needs --listen HOST:PORT"),
        (["--distributed", "worker", "--chief", "localhost:8000"], "needs --worker-id"),
        (
            ["--distributed", "worker", "--chief", "localhost:http", "--worker-id", "w"],
            "needs --chief HOST:PORT",
        ),
    ]:
        result = CliRunner().invoke(cli, ["search", *args])
        assert result.exit_code == 1 and message in result.stderr, result.stderr


def test_trials_that_always_fail_stop_chief_and_worker_with_the_reason(small_npz, tmp_path):
    """Three failed trials in a row (every draw after the baseline) stop a distributed search: the chief (whose oracle counts
    them while a worker reports) and the worker both exit non-zero with the one-line reason,
    instead of the chief hanging on the oracle's lock."""
    plugin = tmp_path / "failing_plugin.py"
    plugin.write_text(
        "import cnnforge\nimport keras\n\n@cnnforge.architecture('failing_net')\ndef build(hp, x, spec):\n"
        "    if hp.Int('attempt', 0, 1000, default=0):  # only the default build (checked first)\n"
        "        raise MemoryError('pretend out of memory')\n"
        "    return keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x))\n"
    )
    run_dir, address = tmp_path / "run", f"127.0.0.1:{free_port()}"

    def failing(*role: str) -> list[str]:
        cmd = small_search(
            small_npz, run_dir, "--tuner", "random", "--max-trials", "6", "--epochs", "1", *role
        )
        cmd[cmd.index("--fix") : cmd.index("--fix") + 6] = []  # failing_net has no such space
        return [*cmd[:3], "--plugin", str(plugin), *cmd[3:], "--arch", "failing_net"]

    chief = start(failing("--distributed", "chief", "--listen", address))
    one = start(failing("--distributed", "worker", "--chief", address, "--worker-id", "w1"))
    try:
        _, worker_err = one.communicate(timeout=180)
        _, chief_err = chief.communicate(timeout=60)
    finally:
        for process in (chief, one):
            process.kill()
    reason = "search stopped: 3 trial(s) failed, the last 3 in a row"
    for code, err in ((one.returncode, worker_err), (chief.returncode, chief_err)):
        lines = [line for line in err.splitlines() if line.startswith("Error:")]
        assert code not in (0, None) and len(lines) == 1, err
        assert reason in lines[0] and "MemoryError: pretend out of memory" in lines[0], err
        assert "Traceback" not in err


def test_a_worker_whose_chief_never_plans_stops_with_one_line(small_npz, tmp_path):
    """An auto search's worker waits for the chief's plan.json up to --worker-timeout; when it
    never comes (no chief, or a run directory the chief does not share), it says so and exits."""
    address = f"127.0.0.1:{free_port()}"  # nobody listens
    role = ("--distributed", "worker", "--chief", address, "--worker-id", "w1")
    cmd = small_search(small_npz, tmp_path / "run", *role, "--worker-timeout", "2")
    lonely = start(cmd)
    try:
        _, err = lonely.communicate(timeout=90)
    finally:
        lonely.kill()
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert lonely.returncode == 1 and len(lines) == 1, err
    assert "no plan from the chief" in lines[0] and "--run-dir" in lines[0], err
    assert "Traceback" not in err
