"""The temperature inside the exported graph: calibrated probabilities, the argmax unchanged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_onnx

from cnnforge.conversion.calibrate import with_temperature
from cnnforge.conversion.export import export
from cnnforge.core import calibration
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.rundir import RunDir


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"x": x})[0]


def test_temperature_in_the_graph_is_the_softmax_at_that_temperature() -> None:
    model = tiny_onnx.conv_classifier()
    x = np.random.default_rng(0).uniform(0, 1, (16, 3, 16, 16)).astype(np.float32)
    before = _run(model, x)
    scaled = with_temperature(model, 2.5)
    onnx.checker.check_model(scaled)
    after = _run(scaled, x)
    assert np.abs(after - calibration.rescale(before, 2.5)).max() < 1e-5
    assert (after.argmax(1) == before.argmax(1)).all()
    assert after.max(1).mean() < before.max(1).mean()  # T > 1: less confident
    with pytest.raises(CnnforgeError, match="positive"):
        with_temperature(model, 0.0)


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_search_saves_the_winning_trials_heldout_probabilities(finished_run) -> None:
    with np.load(RunDir(finished_run.run_dir).heldout) as saved:
        probabilities, labels = saved["probabilities"], saved["labels"]
        assert "trial" in str(saved["source"]) and "validation" in str(saved["source"])
    assert probabilities.shape == (len(labels), 10)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-4)


def test_export_calibrate_puts_the_temperature_in_graph_and_metadata(finished_run, tmp_path):
    out = tmp_path / "calibrated.onnx"
    result = export(finished_run.run_dir, out, calibrate=True)
    meta = _meta(out)
    fitted = json.loads(meta["cnnforge.probability_calibration"])
    assert fitted["method"] == "temperature" and fitted["temperature"] > 0
    assert "trial" in fitted["source"]  # fitted on the winning trial's validation predictions
    assert fitted["nll_after"] <= fitted["nll_before"]
    unknown = json.loads(meta["cnnforge.unknown_threshold"])
    assert unknown["acceptance"] == 0.95 and 0 < unknown["threshold"] <= 1
    assert result.parity.passed and result.parity.calibration["argmax_unchanged"] == 1.0
    assert json.loads(result.parity_path.read_text())["calibration"]["temperature"] == (
        pytest.approx(fitted["temperature"], rel=1e-6)
    )


def test_calibrated_and_plain_exports_agree_on_every_test_argmax(finished_run, tmp_path):
    from cnnforge.deploy.runtime import open_session, predict

    out = tmp_path / "calibrated.onnx"
    export(finished_run.run_dir, out, calibrate=True)
    images = np.load(_npz_of(finished_run.run_dir))["x_test"][..., None].astype(np.float32)
    plain = predict(open_session(finished_run.run_dir / "model.onnx"), images, 64)
    scaled = predict(open_session(out), images, 64)
    assert (plain.argmax(1) == scaled.argmax(1)).all()
    fitted = json.loads(_meta(out)["cnnforge.probability_calibration"])
    assert np.abs(scaled - calibration.rescale(plain, fitted["temperature"])).max() < 1e-4


def test_model_outside_a_run_is_fitted_on_its_own_validation_split(deploy_run, tmp_path):
    keras_file = shutil.copy(deploy_run / "best.keras", tmp_path / "model.keras")
    with pytest.raises(CnnforgeError, match="validation split.*--data"):
        export(keras_file, tmp_path / "a.onnx", calibrate=True)
    assert not (tmp_path / "a.onnx").exists()
    export(keras_file, tmp_path / "b.onnx", calibrate=True, data=_npz_of(deploy_run))
    fitted = json.loads(_meta(tmp_path / "b.onnx")["cnnforge.probability_calibration"])
    assert fitted["source"].startswith("validation split") and "exported model" in fitted["source"]


def _npz_of(run_dir):
    return json.loads((run_dir / "config.json").read_text())["search"]["data"]


@pytest.mark.slow
def test_without_retraining_the_heldout_predictions_are_the_exported_models(small_npz, tmp_path):
    from cnnforge.conversion.parity import keras_outputs
    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.keras_io import load_keras_model
    from cnnforge.tuning.search import SearchConfig, search

    config = SearchConfig(
        data=str(small_npz),
        run_dir=tmp_path / "run",
        tuner="random",
        max_trials=1,
        epochs=1,
        patience=0,
        retrain=False,
    )
    result = search(config)
    with np.load(RunDir(result.run_dir).heldout) as saved:
        probabilities, labels = saved["probabilities"], saved["labels"]
    dataset = load_dataset(str(small_npz))  # the same seeded validation split
    assert (labels == dataset.y_val).all()
    own = keras_outputs(load_keras_model(result.best_model), dataset.x_val, 256)[0]
    np.testing.assert_allclose(probabilities, own, atol=1e-5)


def test_an_int8_variant_carries_the_temperature_and_keeps_its_argmax(deploy_run, tmp_path):
    from conftest import TEST_MODEL_MIN_AGREEMENT

    out = tmp_path / "model-int8.onnx"
    result = export(
        deploy_run,
        out,
        precision="int8",
        min_top1_agreement=TEST_MODEL_MIN_AGREEMENT,
        calibrate=True,
    )
    assert result.parity.calibration["argmax_unchanged"] == 1.0
    meta = _meta(out)
    assert meta["cnnforge.precision"] == "int8"
    assert "cnnforge.probability_calibration" in meta and "cnnforge.calibration" in meta
    assert [n.op_type for n in onnx.load(str(out)).graph.node][-1] == "Softmax"
