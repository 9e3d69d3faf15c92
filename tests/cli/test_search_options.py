"""What the search options become: ``SearchConfig.from_options``, the distributed roles'
addresses included, and the flag combinations it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError
from cnnforge.tuning.config import SearchConfig


def options(**given):
    return {"data": "fashion_mnist_small", "run_dir": Path("runs/x"), **given}


@pytest.mark.parametrize(
    ("role", "address"), [("chief", "0.0.0.0:8000"), ("worker", "chief.local:8000"), (None, None)]
)
def test_a_roles_own_address_becomes_the_address(role, address):
    config = SearchConfig.from_options(
        options(
            distributed=role,
            listen="0.0.0.0:8000",
            chief="chief.local:8000",
            worker_id="w1",
            worker_timeout=60.0,
        )
    )
    assert (config.distributed, config.address) == (role, address)
    assert (config.worker_id, config.worker_timeout) == ("w1", 60.0)


def test_options_not_given_keep_the_defaults():
    config = SearchConfig.from_options(
        options(space={"conv_blocks": "1, 2"}, fix={"pool": "max"}, time_budget=None)
    )
    assert config.space == {"conv_blocks": ["1", "2"]} and config.fix == {"pool": "max"}
    assert (config.arch, config.worker_timeout, config.time_budget) == ("simple_cnn", 300.0, None)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"arch": "resnet", "backbone": "mobilenet_v2"}, "--arch and --backbone are mutually"),
        ({"weights": "none"}, "--weights needs --backbone"),
    ],
)
def test_flags_that_do_not_go_together(given, message):
    with pytest.raises(CnnforgeError, match=message):
        SearchConfig.from_options(options(**given))
    result = CliRunner().invoke(cli, ["search", *(f"--{k}={v}" for k, v in given.items())])
    assert result.exit_code == 2 and message in result.stderr


def test_a_worker_without_an_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli, ["search", "--distributed", "worker", "--chief", "localhost:8000"]
    )
    assert result.exit_code == 1 and "a worker needs --worker-id ID" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_track_is_repeatable_or_a_list_and_a_wrong_name_is_one_line(tmp_path, monkeypatch):
    given = SearchConfig.from_options(options(track=("tensorboard", "mlflow")))
    assert given.track == ["tensorboard", "mlflow"]
    assert SearchConfig.from_options(options(track=())).track is None  # not given: as before
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["search", "--track", "tensorboard,wandb"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --track takes tensorboard, mlflow or none; got wandb"
    ]
    assert not (tmp_path / "runs").exists()
