"""What a resumed search and a retrained trial read back from the run directory: the recorded
preprocessing (not one chosen again from a folder that changed) and ``--class-weight auto``."""

from __future__ import annotations

import keras_tuner
import numpy as np
import pytest
from PIL import Image

from cnnforge.core.errors import CnnforgeError
from cnnforge.modeling.hypermodel import PluginHyperModel
from cnnforge.tuning.final_training import train_again
from cnnforge.tuning.search import SearchConfig, resolve_plugin, search

SMALL = dict(epochs=1, patience=0, retrain=False, fix={"conv_blocks": "1"})


def add_images(folder, side: int, count: int, start: int = 0) -> None:
    rng = np.random.default_rng(side + start)
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{side}_{i}.png")


@pytest.mark.slow
def test_a_changed_folder_is_read_as_recorded_and_its_resume_refused(tmp_path):
    """What reads a run again (a resume, a worker, ``trial_model``) reads the folder with the
    preprocessing the run recorded, not a size chosen from the changed folder; and the changed
    data itself is refused as another search (its fingerprint differs)."""
    folder = tmp_path / "photos"
    add_images(folder, side=16, count=10)
    config = SearchConfig(data=f"dir:{folder}", run_dir=tmp_path / "run", max_trials=1, **SMALL)
    first = search(config)
    assert first.spec.input_shape == (16, 16, 3)  # no --image-size: the folder's median
    add_images(folder, side=24, count=12, start=10)  # now most images are 24x24
    resumed = SearchConfig(data=f"dir:{folder}", run_dir=tmp_path / "run", max_trials=2, **SMALL)
    assert resumed.load_data().spec.input_shape == (16, 16, 3), "read as the run recorded"
    with pytest.raises(CnnforgeError, match=r"differs in data \(split sizes, content\)"):
        search(resumed)
    # a fresh search of the changed folder chooses the new median: the folder did change
    fresh = SearchConfig(data=f"dir:{folder}", run_dir=tmp_path / "fresh", max_trials=1, **SMALL)
    assert fresh.load_data().spec.input_shape == (24, 24, 3)


def _trained_again(small_npz, tmp_path, class_weight):
    config = SearchConfig(data=str(small_npz), run_dir=tmp_path, class_weight=class_weight)
    dataset = config.load_data()
    hypermodel = PluginHyperModel(resolve_plugin(config), dataset.spec, seed=0)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("conv_blocks", 1)
    model = train_again(hypermodel, hp, dataset, config, epochs=1)
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.slow
def test_a_trial_trained_again_keeps_class_weight_auto(small_npz, tmp_path):
    plain = _trained_again(small_npz, tmp_path, None)
    # the same training twice gives the same weights: what differs below is the class weights
    assert all(
        np.array_equal(a, b)
        for a, b in zip(plain, _trained_again(small_npz, tmp_path, None), strict=True)
    )
    weighted = _trained_again(small_npz, tmp_path, "auto")
    assert not all(np.array_equal(a, b) for a, b in zip(plain, weighted, strict=True))
