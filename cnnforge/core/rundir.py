"""``RunDir``: every file of a run directory, named, read and written in one place.

```
RUN/
  config.json      the resolved search configuration, the DataSpec, library versions
  plan.json        the auto search's plan (rungs, final epochs, batch size, how it was made)
  tuner/           KerasTuner state; tuner/trial_ID/cnnforge_cost.json per trial
  trials.csv       one row per trial
  search.json      the best trial, and how it was trained again
  best.keras       the best model
  model.onnx       the export; parity.json beside it (NAME.parity.json for a variant),
                   parity.failed.json: the evidence of the last refused export, if any
  bench.json       latency results
  evaluation.json  onnxruntime accuracy on the test split
  heldout.npz      the images the exported model did not train on (calibration, unknown)
  report.md, report.html
  tensorboard/     TensorBoard logs: trial_ID/ per trial, the HParams configuration
  mlflow.db        MLflow's local store (--track mlflow), mlartifacts/ its artifacts
  mlflow.json      the MLflow run ids of this search, so that a resumed search continues them
```

Stages hand each other a ``RunDir`` (or its path); none of them spells a file name itself.
Every write goes through a temporary name and a rename (``core.atomic``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnforge.core.atomic import atomic_write_text
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import Preprocessing

CONFIG = "config.json"
DATA = "data.json"
PLAN = "plan.json"
TUNER = "tuner"
TRIALS = "trials.csv"
SEARCH = "search.json"
BEST_MODEL = "best.keras"
ONNX = "model.onnx"
PARITY = "parity.json"
BENCH = "bench.json"
EVALUATION = "evaluation.json"
HELDOUT = "heldout.npz"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
COST = "cnnforge_cost.json"
TRIAL_PREFIX = "trial_"
TENSORBOARD = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_RUNS = "mlflow.json"

# The files ``cnnforge run`` leaves, in the order the stages write them.
ARTIFACTS = (CONFIG, TRIALS, BEST_MODEL, ONNX, PARITY, BENCH, EVALUATION, REPORT_MD, REPORT_HTML)
# The JSON files a report reads, by the key ``read()`` returns them under.
_JSON_FILES = {
    "config": CONFIG,
    "data": DATA,
    "plan": PLAN,
    "search": SEARCH,
    "parity": PARITY,
    "bench": BENCH,
    "evaluation": EVALUATION,
}


@dataclass(frozen=True)
class RunDir:
    """A run directory. ``RunDir(path)`` names its files; the ``read_*`` / ``write_*`` methods
    read and write them (JSON pretty-printed, every write atomic)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_tuner(cls, project_dir: Path | str) -> RunDir:
        """The run directory around KerasTuner's project folder (``RUN/tuner``)."""
        return cls(Path(project_dir).parent)

    # --- names ---------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def data(self) -> Path:
        """data.json: the preprocessing the data was read with, files skipped and ignored."""
        return self.path / DATA

    @property
    def tuner(self) -> Path:
        return self.path / TUNER

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def trials(self) -> Path:
        return self.path / TRIALS

    @property
    def search(self) -> Path:
        return self.path / SEARCH

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def onnx(self) -> Path:
        return self.path / ONNX

    @property
    def bench(self) -> Path:
        return self.path / BENCH

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION

    @property
    def heldout(self) -> Path:
        """heldout.npz: which images of train+validation (``indices`` into their
        concatenation, ``labels``) the exported model did not train on: its temperature and
        unknown threshold are fitted on them. Older runs saved the winning trial's
        ``probabilities`` on the validation split instead."""
        return self.path / HELDOUT

    @property
    def report_md(self) -> Path:
        return self.path / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.path / REPORT_HTML

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def mlflow_db(self) -> Path:
        return self.path / MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / MLFLOW_ARTIFACTS

    @property
    def mlflow_runs(self) -> Path:
        return self.path / MLFLOW_RUNS

    def trial_dir(self, trial_id: str) -> Path:
        return self.tuner / f"{TRIAL_PREFIX}{trial_id}"

    def trial_ids(self) -> list[str]:
        """The ids of the trials KerasTuner has a folder for, sorted."""
        return sorted(
            p.name.removeprefix(TRIAL_PREFIX) for p in self.tuner.glob(TRIAL_PREFIX + "*")
        )

    def model_file(self, name: str) -> Path:
        """``name`` as a model file in this run (``trial-3.keras``, ``model-int8.onnx``...)."""
        return self.path / name

    def artifacts(self) -> dict[str, Path]:
        return {name: self.path / name for name in ARTIFACTS}

    @staticmethod
    def parity_for(onnx_path: Path) -> Path:
        """``parity.json`` beside a run's ``model.onnx``, ``NAME.parity.json`` beside any other."""
        onnx_path = Path(onnx_path)
        name = PARITY if onnx_path.name == ONNX else f"{onnx_path.stem}.{PARITY}"
        return onnx_path.with_name(name)

    @staticmethod
    def failed_parity_for(onnx_path: Path) -> Path:
        """Where a refused export's evidence goes (``parity.failed.json``...), so that the kept
        model's ``parity.json`` still describes it."""
        parity = RunDir.parity_for(onnx_path)
        return parity.with_name(f"{parity.stem}.failed.json")

    # --- reading -------------------------------------------------------------------------

    def is_run(self) -> bool:
        return self.config.is_file()

    def require(self) -> RunDir:
        """This run directory, or a one-line error when it is not one."""
        if not self.is_run():
            raise CnnforgeError(f"{self.path} is not a cnnforge run directory (no {CONFIG})")
        return self

    def read_config(self) -> dict[str, Any]:
        """config.json: ``search`` (the configuration), ``data_spec``, ``versions``."""
        return json.loads(self.require().config.read_text())

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text()) if path.is_file() else None

    def read_trials(self) -> list[dict[str, str]]:
        """trials.csv as rows of text (empty before the first trial ends)."""
        if not self.trials.is_file():
            return []
        with self.trials.open(newline="") as f:
            return list(csv.DictReader(f))

    def read_preprocessing(self) -> Preprocessing | None:
        """The preprocessing the run's data was read with (data.json); None where it records
        none (no data.json: a run made before it existed)."""
        saved = (self.read_json(self.data) or {}).get("preprocessing")
        return Preprocessing.from_json(saved) if saved else None

    def read_cost(self, trial_id: str) -> dict[str, Any]:
        """What cnnforge recorded beside a trial (cost, history, failure); empty if nothing."""
        return self.read_json(self.trial_dir(trial_id) / COST) or {}

    def read(self) -> dict[str, Any]:
        """The JSON files that exist (``config``, ``data``, ``plan``, ``search``, ``parity``,
        ``bench``, ``evaluation``) and the trials as rows: everything a report is made from."""
        self.require()
        found = {
            key: self.read_json(self.path / name)
            for key, name in _JSON_FILES.items()
            if (self.path / name).is_file()
        }
        return {**found, "trials": self.read_trials()}

    # --- writing -------------------------------------------------------------------------

    def write_json(self, path: Path, value: Any) -> Path:
        atomic_write_text(path, json.dumps(value, indent=2))
        return path

    def write_config(
        self, search: dict[str, Any], data_spec: dict[str, Any], versions: dict[str, str]
    ) -> Path:
        return self.write_json(
            self.config, {"search": search, "data_spec": data_spec, "versions": versions}
        )

    def write_trials(self, header: list[str], rows: list[list[Any]]) -> Path:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        atomic_write_text(self.trials, out.getvalue())
        return self.trials

    def write_cost(self, trial_id: str, cost: dict[str, Any]) -> Path:
        path = self.trial_dir(trial_id) / COST
        atomic_write_text(path, json.dumps(cost))
        return path
