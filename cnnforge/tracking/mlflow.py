"""MLflow (``--track mlflow``, the ``mlflow`` extra): a parent run for the search, a child run
per trial (hyperparameters as params, per-epoch metrics, final cost and status), and, after
``cnnforge run``, the winner's files on the parent run and its ONNX model registered.

The store is ``MLFLOW_TRACKING_URI`` when set, else MLflow's local SQLite store in the run
directory (``sqlite:///RUN/mlflow.db``, artifacts in ``RUN/mlartifacts``). The run ids are kept
in ``RUN/mlflow.json``, so a resumed search, and the pipeline after it, log to the same runs.
Everything goes through ``MlflowClient`` with explicit run ids: no global active run, so that a
distributed chief's watcher thread can log too.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.rundir import RunDir

EXPERIMENT = "cnnforge"  # unless MLFLOW_EXPERIMENT_NAME says otherwise
# Each trial's cost, logged on its run when it ends.
TRIAL_METRICS = ("score", "latency_ms", "params", "size_mb", "flops", "epochs", "duration_s")


def tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or the SQLite store in the run directory."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{RunDir(run_dir).mlflow_db.resolve()}"
    )


def registered_model_name(model_name: str) -> str:
    """The registry name of a search's winners: ``cnnforge-ARCH`` (or backbone)."""
    return "cnnforge-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_")


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, model_name: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise CnnforgeError("MLflow is not installed: pip install 'cnnforge[mlflow]'") from None
        for noisy in ("mlflow", "alembic"):  # store creation logs its migrations at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.run = RunDir(run_dir)
        self.model_name = model_name
        self.uri = tracking_uri(self.run.path)
        self._own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        registry = os.environ.get("MLFLOW_REGISTRY_URI") or self.uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=registry)
        saved = self.run.read_json(self.run.mlflow_runs) or {}
        # Runs recorded in another store are not continued: this store gets its own.
        self.ids: dict[str, Any] = saved if saved.get("tracking_uri") == self.uri else {}
        self.ids.setdefault("tracking_uri", self.uri)
        self.ids.setdefault("trials", {})
        self._open: set[str] = set()  # runs this process set RUNNING and has not ended
        # trial id → the last epoch its run has logged already (a trial re-run after an
        # interruption logs only the epochs beyond it: no step twice)
        self._logged_to: dict[str, int] = {}

    # --- runs --------------------------------------------------------------------------

    def _save_ids(self) -> None:
        self.run.write_json(self.run.mlflow_runs, self.ids)

    def _experiment_id(self) -> str:
        if "experiment_id" not in self.ids:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                self.ids["experiment_id"] = found.experiment_id
            else:
                location = self.run.mlflow_artifacts.resolve().as_uri() if self._own_store else None
                self.ids["experiment_id"] = self.client.create_experiment(
                    name, artifact_location=location
                )
        return self.ids["experiment_id"]

    def _continue(self, run_id: str | None) -> bool:
        """Set a recorded run RUNNING again; False when there is none (or it was deleted)."""
        if not run_id:
            return False
        try:
            found = self.client.get_run(run_id)
        except Exception:
            return False
        if found.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        self._open.add(run_id)
        return True

    def _create(self, run_name: str, tags: dict[str, str]) -> str:
        created = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self._open.add(created.info.run_id)
        return created.info.run_id

    @property
    def parent_id(self) -> str:
        if "parent" not in self.ids:
            raise CnnforgeError(f"{self.run.mlflow_runs} records no MLflow run of this search")
        return self.ids["parent"]

    # --- events ------------------------------------------------------------------------

    def search_started(self, search: Mapping[str, Any], hyperparameters: Sequence[str]) -> None:
        if self._continue(self.ids.get("parent")):
            return
        tags = {"cnnforge.run_dir": str(self.run.path.resolve()), "cnnforge.model": self.model_name}
        self.ids["parent"] = self._create(self.run.path.name, tags)
        self.ids["trials"] = {}
        self._save_ids()
        params = {k: _param(v) for k, v in search.items() if v not in (None, {}, [])}
        self._log(self.ids["parent"], params=params)

    def trial_started(self, trial_id: str, hyperparameters: Mapping[str, Any]) -> None:
        if self._continue(self.ids["trials"].get(trial_id)):
            self._logged_to[trial_id] = self._last_epoch(self.ids["trials"][trial_id])
            return
        tags = {"mlflow.parentRunId": self.parent_id, "cnnforge.trial_id": trial_id}
        self.ids["trials"][trial_id] = self._create(f"trial_{trial_id}", tags)
        self._save_ids()
        params = {k: _param(v) for k, v in hyperparameters.items()}
        self._log(self.ids["trials"][trial_id], params=params)

    def epoch_ended(self, trial_id: str, epoch: int, scalars: Mapping[str, float]) -> None:
        if epoch <= self._logged_to.get(trial_id, -1):
            return
        self._log(self.ids["trials"][trial_id], metrics=scalars, step=epoch)

    def trial_ended(self, trial: Mapping[str, Any]) -> None:
        run_id = self.ids["trials"][str(trial["trial_id"])]
        values = {k: trial.get(k) for k in TRIAL_METRICS}
        self._log(run_id, metrics={k: v for k, v in values.items() if v is not None})
        self.client.set_tag(run_id, "cnnforge.status", str(trial.get("status", "")))
        if trial.get("message"):
            self.client.set_tag(run_id, "cnnforge.message", str(trial["message"])[:5000])
        self._end(run_id, "FINISHED" if trial.get("status") == "COMPLETED" else "FAILED")

    def search_ended(self, best: Mapping[str, Any] | None) -> None:
        if best is not None:
            self.client.set_tag(self.parent_id, "cnnforge.best_trial", str(best["trial_id"]))
            values = {f"best_{k}": best.get(k) for k in TRIAL_METRICS}
            self._log(self.parent_id, metrics={k: v for k, v in values.items() if v is not None})
        self._end(self.parent_id, "FINISHED")

    def winner(self, artifacts: Sequence[Path], onnx: Path | None) -> None:
        """The winner's files on the search's run; its ONNX model registered as a new version
        of ``cnnforge-MODEL`` (the registry entry points at the logged ``model.onnx``)."""
        parent = self.parent_id
        for path in artifacts:
            self.client.log_artifact(parent, str(path))
        if onnx is None:
            return
        if Path(onnx) not in {Path(p) for p in artifacts}:
            self.client.log_artifact(parent, str(onnx))
        name = registered_model_name(self.model_name)
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(parent).info.artifact_uri}/{Path(onnx).name}"
        version = self.client.create_model_version(name, source=source, run_id=parent)
        self.client.set_tag(parent, "cnnforge.registered_model", f"{name}/{version.version}")

    def close(self) -> None:
        """Runs left RUNNING (an interrupted search) are KILLED; a resume sets them going again."""
        for run_id in list(self._open):
            self._end(run_id, "KILLED")

    # --- helpers -------------------------------------------------------------------------

    def _last_epoch(self, run_id: str) -> int:
        """The last epoch step ``run_id`` holds a metric for; -1 if none."""
        keys = set(self.client.get_run(run_id).data.metrics) - set(TRIAL_METRICS)
        steps = [m.step for k in keys for m in self.client.get_metric_history(run_id, k)]
        return max(steps, default=-1)

    def _end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)
        self._open.discard(run_id)

    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
        )


def _param(value: Any) -> str:
    """A param value as MLflow keeps it (text, at most 6000 characters)."""
    return str(value)[:6000]
