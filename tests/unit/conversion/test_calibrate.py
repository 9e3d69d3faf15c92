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


def test_the_graph_undoes_label_smoothing_before_its_temperature() -> None:
    model = tiny_onnx.conv_classifier()
    x = np.random.default_rng(0).uniform(0, 1, (16, 3, 16, 16)).astype(np.float32)
    before = _run(model, x)
    scaled = with_temperature(model, 1.5, label_smoothing=0.1)
    onnx.checker.check_model(scaled)
    after = _run(scaled, x)
    expected = calibration.rescale(before, 1.5, 0.1)
    assert np.abs(after - expected).max() < 1e-5
    assert np.abs(after - calibration.rescale(before, 1.5)).max() > 1e-3  # not a temperature
    assert (after.argmax(1) == before.argmax(1)).all()


def _meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_the_final_training_holds_out_a_stratified_calibration_slice(finished_run) -> None:
    run = RunDir(finished_run.run_dir)
    with np.load(run.heldout) as saved:
        indices, labels = saved["indices"], saved["labels"]
        assert "final training" in str(saved["source"])
    data = np.load(_npz_of(finished_run.run_dir))
    total = len(data["y_train"])  # train + validation: what the final training would take
    final = json.loads(run.search.read_text())["final_training"]
    assert final["calibration_images"] == len(indices)
    assert abs(len(indices) - 0.1 * total) <= 5  # 10 %, rounded class by class
    assert final["examples"] == total - len(indices)
    assert len(set(indices.tolist())) == len(indices) and indices.max() < total
    assert set(labels.tolist()) == set(data["y_train"].tolist())  # every class has its share


def test_export_calibrate_puts_the_temperature_in_graph_and_metadata(finished_run, tmp_path):
    out = tmp_path / "calibrated.onnx"
    result = export(finished_run.run_dir, out, calibrate=True)
    meta = _meta(out)
    fitted = json.loads(meta["cnnforge.probability_calibration"])
    assert fitted["method"] == "temperature" and fitted["temperature"] > 0
    # fitted on the final model's own predictions of the slice it did not train on
    assert "held out of the final training" in fitted["source"]
    assert fitted["nll_after"] <= fitted["nll_before"]
    unknown = json.loads(meta["cnnforge.unknown_threshold"])
    assert unknown["acceptance"] == 0.95 and unknown["score"] == "knn_cosine"
    assert unknown["output"] == "ood_score" and -1 <= unknown["threshold"] <= 1
    assert result.parity.passed and result.parity.calibration["argmax_unchanged"] == 1.0
    assert result.parity.calibration["ood_score_max_abs_diff"] < 1e-4
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
def test_a_model_trained_with_label_smoothing_is_calibrated_with_it_undone(deploy_run, tmp_path):
    """A stranger's .keras file compiled with label smoothing: export reads it from the loss,
    undoes it in the graph before the temperature, and records it."""
    import keras

    model = keras.models.load_model(deploy_run / "best.keras", compile=False)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    keras_file = tmp_path / "smoothed.keras"
    model.save(keras_file)
    result = export(keras_file, tmp_path / "s.onnx", calibrate=True, data=_npz_of(deploy_run))
    fitted = json.loads(_meta(tmp_path / "s.onnx")["cnnforge.probability_calibration"])
    assert fitted["label_smoothing"] == pytest.approx(0.1)
    assert "label smoothing undone" in fitted["method"]
    assert result.parity.calibration["argmax_unchanged"] == 1.0
    assert result.parity.calibration["max_abs_diff_from_numpy"] < 1e-4
    export(deploy_run / "best.keras", tmp_path / "p.onnx", calibrate=True)
    plain = json.loads(_meta(tmp_path / "p.onnx")["cnnforge.probability_calibration"])
    assert plain["label_smoothing"] == 0.0 and plain["method"] == "temperature"


def test_without_retraining_the_heldout_images_are_the_validation_split(small_npz, tmp_path):
    from cnnforge.data.dataset import load_dataset
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
        indices, labels = saved["indices"], saved["labels"]
    dataset = load_dataset(str(small_npz))  # the same seeded validation split
    assert (labels == dataset.y_val).all()
    np.testing.assert_array_equal(
        indices, np.arange(len(dataset.y_train), len(dataset.y_train) + len(dataset.y_val))
    )
    fitted = export(result.run_dir, calibrate=True).calibration
    assert "did not train on" in fitted["probability_calibration"]["source"]


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
    graph = onnx.load(str(out)).graph
    producers = {name: node.op_type for node in graph.node for name in node.output}
    assert producers["probabilities"] == "Softmax" and producers["ood_score"] == "Gather"
    assert json.loads(meta["cnnforge.unknown_threshold"])["score"] == "knn_cosine"
    assert result.parity.calibration["ood_score_max_abs_diff"] < 1e-4


def test_the_ood_score_is_the_knn_cosine_of_the_final_dense_layers_input(finished_run, tmp_path):
    """The graph's second output against NumPy's k-NN score of the same features, the
    threshold against the held-out slice, and noise scoring below clothing."""
    from cnnforge.conversion.calibrate import feature_tensor, with_features
    from cnnforge.data.dataset import load_dataset

    out = tmp_path / "calibrated.onnx"
    export(finished_run.run_dir, out, calibrate=True)
    graph = onnx.load(str(out))
    assert [o.name for o in graph.graph.output] == ["probabilities", "ood_score"]
    plain = onnx.load(str(finished_run.run_dir / "model.onnx"))
    features = feature_tensor(plain)
    assert features is not None and "Relu" in features  # the Dense 64 relu before the softmax
    unknown = json.loads(_meta(out)["cnnforge.unknown_threshold"])
    bank = np.array(onnx.numpy_helper.to_array(_initializer(graph, "ood_bank"))).T
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    probe = ort.InferenceSession(
        with_features(plain, features).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    dataset = load_dataset(_npz_of(finished_run.run_dir))
    with np.load(RunDir(finished_run.run_dir).heldout) as saved:
        held = np.concatenate([dataset.x_train, dataset.x_val])[saved["indices"]]
    held = held.astype(np.float32)
    noise = np.random.default_rng(0).uniform(0, 255, (64, 28, 28, 1)).astype(np.float32)
    for images in (held, noise):
        score = session.run(["ood_score"], {"images": images})[0]
        expected = calibration.knn_score(probe.run(None, {"images": images})[1], bank, unknown["k"])
        np.testing.assert_allclose(score, expected, atol=1e-5)
    held_scores = session.run(["ood_score"], {"images": held})[0]
    assert (held_scores >= unknown["threshold"]).mean() >= 0.95
    noise_scores = session.run(["ood_score"], {"images": noise})[0]
    assert np.median(noise_scores) < np.median(held_scores)


def _initializer(graph: onnx.ModelProto, name: str):
    return next(i for i in graph.graph.initializer if i.name == name)


def test_rows_of_train_and_validation_come_in_the_order_asked(finished_run) -> None:
    from cnnforge.conversion.calibrate import rows_of
    from cnnforge.data.dataset import load_dataset

    dataset = load_dataset(_npz_of(finished_run.run_dir))
    both = np.concatenate([dataset.x_train, dataset.x_val])
    indices = np.array([len(dataset.y_train) + 3, 0, len(both) - 1, 5])  # validation first
    np.testing.assert_array_equal(rows_of(dataset, indices), both[indices])
