"""Real tf2onnx conversions checked with real onnxruntime sessions."""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import pytest

from cnnforge.conversion.export import export, to_onnx
from cnnforge.conversion.parity import check_parity
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.runtime import metadata, open_session, predict

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0, 255, (40, 16, 16, 3)).astype("float32")


def test_exported_run_has_the_contract_metadata_and_parity(finished_run):
    run_dir = finished_run.run_dir
    session = open_session(run_dir / "model.onnx")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("images", ["batch", 28, 28, 1], "tensor(float)")
    assert (out.name, out.shape) == ("probabilities", ["batch", 10])
    meta = metadata(session)
    assert meta["class_names"][0] == "T-shirt/top" and len(meta["class_names"]) == 10
    assert meta["input_layout"] == "NHWC" and meta["pixel_range"] == [0, 255]
    assert meta["source"].endswith("best.keras")
    assert {"cnnforge", "keras", "tf2onnx", "tensorflow"} <= set(meta["versions"])

    parity = json.loads((run_dir / "parity.json").read_text())
    assert parity["passed"] and parity["batch_axis_dynamic"] and parity["opset"] == 17
    assert parity["inputs"].startswith("test split of")
    assert [c["batch_size"] for c in parity["cases"]] == [1, 32]
    assert all(c["max_abs_diff"] < 1e-4 and c["top1_agreement"] == 1.0 for c in parity["cases"])


def _save(model: keras.Model, tmp_path, name: str = "m.keras"):
    path = tmp_path / name
    model.save(path)
    return path


def test_sequential_with_batchnorm_dropout_rescaling_exports(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.layers[2].moving_mean.assign(np.full(4, 0.2, "float32"))  # non-trivial BN statistics
    result = export(_save(model, tmp_path), tmp_path / "seq.onnx")
    assert result.parity.passed and result.parity.inputs == "random pixels"
    got = predict(open_session(result.onnx_path), IMAGES)
    np.testing.assert_allclose(got, model(IMAGES, training=False).numpy(), atol=1e-5)


def test_normalization_layer_constants_stay_inside_the_graph(tmp_path):
    """tf2onnx's from_function turns Normalization constants into graph inputs (EfficientNet)."""
    inputs = keras.Input((16, 16, 3), name="images")
    norm = keras.layers.Normalization(mean=[100.0, 110.0, 120.0], variance=[900.0, 1000.0, 1100.0])
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(norm(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    proto = to_onnx(model)
    assert [i.name for i in proto.graph.input] == ["images"]
    report = check_parity(model, proto.SerializeToString(), IMAGES, inputs="random")
    assert report.passed, report.mismatches


def test_parity_gathers_every_mismatch_before_failing():
    def classifier(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
        return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))

    other = to_onnx(classifier(1)).SerializeToString()
    report = check_parity(classifier(2), other, IMAGES, inputs="random", batch_sizes=(1, 8))
    assert not report.passed
    assert [c.batch_size for c in report.cases] == [1, 8]
    assert len(report.mismatches) == 2
    assert report.mismatches[0].startswith("batch 1, probabilities: max abs diff")
    assert "batch 8" in report.summary()


def test_exported_onnx_is_a_valid_model_with_named_batch_axis(finished_run):
    model = onnx.load(finished_run.run_dir / "model.onnx")
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.producer_name == "cnnforge"


def test_corrupt_keras_file_is_one_clear_error_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CnnforgeError, match=r"cannot load Keras model .*bad.keras"):
        export(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras"]


def test_missing_source_and_bad_output_name(tmp_path, finished_run):
    with pytest.raises(CnnforgeError, match="does not exist"):
        export(tmp_path / "nope.keras")
    with pytest.raises(CnnforgeError, match="has no best.keras"):
        export(tmp_path)
    with pytest.raises(CnnforgeError, match=r"must end in \.onnx"):
        export(finished_run.run_dir, tmp_path / "model.txt")


def _small_model() -> keras.Model:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_export_records_the_pixel_range_once_and_the_preprocessing_without_it(tmp_path):
    from cnnforge.core.preprocessing import Preprocessing

    result = export(_save(_small_model(), tmp_path), tmp_path / "m.onnx")
    meta = metadata(open_session(result.onnx_path))
    assert meta["pixel_range"] == [0, 255]
    assert "pixel_range" not in meta["preprocessing"]
    assert Preprocessing.of_model(meta, (16, 16, 3)) == Preprocessing.for_shape((16, 16, 3))


def test_a_run_whose_data_json_does_not_fit_its_model_is_refused_not_exported(tmp_path):
    """data.json records 20×20 images, best.keras takes 16×16: exporting would record a
    preprocessing predict then refuses; the export says so instead, and writes nothing."""
    from cnnforge.core.preprocessing import Preprocessing
    from cnnforge.core.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    _save(_small_model(), run.path, "best.keras")
    run.write_config({"data": "elsewhere.npz"}, {"class_names": ["a", "b", "c"]}, {})
    recorded = Preprocessing(size=(20, 20), color_mode="RGB")
    run.write_json(run.data, {"preprocessing": recorded.to_json()})
    with pytest.raises(CnnforgeError, match=r"run of .*best\.keras \(its data\.json\) records "):
        export(run.path)
    assert not run.onnx.exists()


def _nan_model() -> keras.Model:
    """A classifier whose last Dense weights are NaN: every output is NaN, in Keras and ONNX."""
    model = _small_model()
    dense = model.layers[-1]
    dense.kernel.assign(np.full(dense.kernel.shape, np.nan, "float32"))
    return model


def test_parity_fails_on_non_finite_outputs():
    """``nan > atol`` is false: a NaN model used to pass with "max abs diff nan"."""
    model = _nan_model()
    report = check_parity(model, to_onnx(model).SerializeToString(), IMAGES, inputs="random")
    assert not report.passed
    assert "non-finite" in report.mismatches[0] and "Keras" in report.mismatches[0]
    assert all(c.nonfinite_keras == c.images * 3 for c in report.cases)


def test_export_of_a_nan_model_is_refused_and_writes_no_model(tmp_path):
    with pytest.raises(CnnforgeError, match=r"failed parity: .*non-finite"):
        export(_save(_nan_model(), tmp_path), tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


@pytest.mark.parametrize(("precision", "floor"), [("fp32", 0.999), ("fp16", 0.99)])
def test_float_precisions_have_a_top1_agreement_floor(precision, floor):
    from cnnforge.conversion.export import TOLERANCES

    assert TOLERANCES[precision][1] == floor


def test_a_failed_re_export_keeps_the_old_model_and_its_evidence(tmp_path):
    """A model and its parity.json are replaced together or not at all."""
    source, out = _save(_small_model(), tmp_path), tmp_path / "m.onnx"
    export(source, out)
    evidence = tmp_path / "m.parity.json"
    before = out.read_bytes(), evidence.read_bytes()
    _save(_nan_model(), tmp_path)  # the same source, now broken
    with pytest.raises(CnnforgeError, match=r"failed parity: .*m\.parity\.failed\.json"):
        export(source, out)
    assert (out.read_bytes(), evidence.read_bytes()) == before
    failed = json.loads((tmp_path / "m.parity.failed.json").read_text())
    assert not failed["passed"] and "non-finite" in failed["mismatches"][0]
    _save(_small_model(), tmp_path)
    export(source, out)
    assert not (tmp_path / "m.parity.failed.json").exists(), "stale failed evidence is removed"
    assert json.loads(evidence.read_text())["passed"]


def test_metadata_names_the_model_and_data_but_no_local_path(finished_run, small_npz, tmp_path):
    """The model travels; the folders of the machine that made it must not travel with it."""
    run_dir = finished_run.run_dir
    lone = tmp_path / "lone.keras"
    lone.write_bytes((run_dir / "best.keras").read_bytes())
    export(lone, tmp_path / "lone.onnx", data=str(small_npz))
    for path in (run_dir / "model.onnx", tmp_path / "lone.onnx"):
        props = {p.key: p.value for p in onnx.load(path).metadata_props}
        for folder in (tmp_path, run_dir.parent, small_npz.parent):
            assert not [k for k, v in props.items() if str(folder) in v], folder
    meta = metadata(open_session(run_dir / "model.onnx"))
    assert (meta["source"], meta["run"]) == ("best.keras", run_dir.name)
    assert meta["accuracy"]["data"] == small_npz.name
    assert metadata(open_session(tmp_path / "lone.onnx"))["source"] == "lone.keras"


def test_conversion_leaves_no_tf2onnx_graph_behind():
    """tf2onnx's graph objects hold reference cycles: uncollected, ConvNeXt-Tiny's conversion
    kept 3.6 GB resident through the parity check and the accuracy gate that follow it."""
    import gc

    import tf2onnx

    inputs = keras.Input((8, 8, 1), name="images")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    gc.collect()
    gc.disable()  # only what to_onnx collects itself
    try:
        to_onnx(model)
        left = [o for o in gc.get_objects() if isinstance(o, tf2onnx.graph.Graph)]
    finally:
        gc.enable()
    assert not left
