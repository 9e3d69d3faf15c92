"""A run directory of a backbone classifier written without a search: what ``cnnforge search
--backbone NAME --weights none`` leaves (config.json, data.json, best.keras) for the default
build of the backbone at ``image_size``, its weights as initialised. Export, evaluate, report and
bench read it like any run. Also a script: ``python tests/backbone_run.py RUN_DIR NAME SIZE [DATA]``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import keras_tuner

from cnnforge.core.rundir import RunDir
from cnnforge.modeling.hypermodel import build_model
from cnnforge.tuning.config import SearchConfig
from cnnforge.tuning.search import library_versions, resolve_plugin


def make_backbone_run(
    run_dir: Path, backbone: str, image_size: int, data: str = "fashion_mnist_small"
) -> Path:
    config = SearchConfig(
        data=data,
        backbone=backbone,
        weights="none",
        run_dir=run_dir,
        fix={"image_size": str(image_size)},
    )
    dataset = config.load_data()
    hp = keras_tuner.HyperParameters()
    hp.Fixed("image_size", image_size)
    model = build_model(resolve_plugin(config), dataset.spec, hp)
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    model.save(run.best_model)
    run.write_config(config.to_json(), asdict(dataset.spec), library_versions())
    run.write_json(run.data, dataset.record())
    return run.path


if __name__ == "__main__":
    target, name, size, *data = sys.argv[1:]
    print(make_backbone_run(Path(target), name, int(size), *data))
