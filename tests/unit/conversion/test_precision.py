"""Precision variants and layouts of a real trained model: real tf2onnx conversions, onnxruntime's
real quantizer and float16 converter, real sessions, and the accuracy gate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import TEST_MODEL_MIN_AGREEMENT

from cnnforge.conversion.export import export
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.data.dataset import load_dataset
from cnnforge.deploy import onnxinfo
from cnnforge.deploy.runtime import metadata, open_session, predict, to_layout
from cnnforge.evaluation.evaluate import evaluate


def test_int8_is_static_qdq_per_channel_calibrated_and_keeps_accuracy(variants, small_npz):
    result = variants["int8"]
    assert result.onnx_path.name == "model-int8.onnx"
    assert result.parity_path.name == "model-int8.parity.json"
    proto = onnx.load(result.onnx_path)
    onnx.checker.check_model(proto)
    ops = onnxinfo.operator_counts(proto)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0, "QDQ format"
    assert "DynamicQuantizeLinear" not in ops and "ConvInteger" not in ops, "not dynamic"
    weights = {init.name: init for init in proto.graph.initializer}
    conv_weight_scales = [
        onnx.numpy_helper.to_array(weights[node.input[1]])
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear"
        and weights.get(node.input[0]) is not None
        and weights[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(weights[node.input[0]].dims) == 4
    ]
    assert conv_weight_scales and all(s.size > 1 for s in conv_weight_scales), "per channel"
    assert onnxinfo.parameter_types(proto)["int8"] > 0.9 * onnxinfo.parameter_count(proto)
    assert result.size_bytes < 0.4 * variants["fp32"].size_bytes

    meta = metadata(open_session(result.onnx_path))
    assert meta["precision"] == "int8"
    assert meta["calibration"]["images"] == 256 and meta["calibration"]["format"] == "QDQ"
    assert meta["calibration"]["source"] == f"train split of {small_npz.name}"
    accuracy = meta["accuracy"]
    assert accuracy["images"] == 200 and accuracy["split"] == "test"
    assert accuracy["passed"] and not accuracy["forced"]
    assert accuracy["drop_points"] <= 1.0
    # the figure in the metadata is what onnxruntime really scores on the test split
    assert evaluate(result.onnx_path, str(small_npz)).accuracy == pytest.approx(
        accuracy["onnxruntime"]
    )

    parity = json.loads(result.parity_path.read_text())
    assert parity["passed"] and parity["precision"] == "int8" and parity["atol"] is None
    assert parity["min_top1_agreement"] == TEST_MODEL_MIN_AGREEMENT
    assert [(c["batch_size"], c["output"]) for c in parity["cases"]] == [
        (1, "probabilities"),
        (32, "probabilities"),
    ]
    assert parity["accuracy"] == accuracy


def test_fp16_halves_the_weights_and_keeps_float32_input_and_output(variants):
    result = variants["fp16"]
    proto = onnx.load(result.onnx_path)
    onnx.checker.check_model(proto)  # nodes in topological order
    (image,), (probabilities,) = onnxinfo.signature(proto)
    assert (image.dtype, probabilities.dtype) == ("float32", "float32")
    assert set(onnxinfo.parameter_types(proto)) <= {"float16", "int64", "int32"}
    assert result.size_bytes < 0.6 * variants["fp32"].size_bytes
    assert onnxinfo.flops_per_image(proto) == onnxinfo.flops_per_image(variants["fp32"].onnx_path)
    parity = result.parity
    assert parity.passed and parity.atol == 1e-2
    assert all(c.max_abs_diff < 1e-2 for c in parity.cases)
    assert metadata(open_session(result.onnx_path))["precision"] == "fp16"


def test_fp16_on_cpu_warns_that_it_saves_size_not_time(deploy_run, tmp_path):
    with pytest.warns(CnnforgeWarning, match="fp16 on cpu: .*not a speed-up"):
        export(deploy_run, tmp_path / "half.onnx", precision="fp16")
    assert (tmp_path / "half.parity.json").is_file()


def test_nchw_export_takes_channels_first_and_scores_like_nhwc(variants, small_npz):
    result = variants["nchw"]
    assert result.onnx_path.name == "model-nchw.onnx" and result.layout == "NCHW"
    session = open_session(result.onnx_path)
    assert session.get_inputs()[0].shape == ["batch", 1, 28, 28]
    meta = metadata(session)
    assert meta["input_layout"] == "NCHW" and meta["input_shape"] == [1, 28, 28]
    assert onnxinfo.image_input(result.onnx_path).layout == "NCHW"
    x = load_dataset(str(small_npz)).x_test[:16].astype(np.float32)
    nhwc = predict(open_session(variants["fp32"].onnx_path), x)
    np.testing.assert_allclose(predict(session, to_layout(x, "NCHW")), nhwc, atol=1e-5)
    assert evaluate(result.onnx_path, str(small_npz)).accuracy == pytest.approx(
        evaluate(variants["fp32"].onnx_path, str(small_npz)).accuracy
    )
    assert result.parity.layout == "NCHW" and result.parity.passed


def test_every_export_records_its_accuracy_next_to_keras(variants):
    fp32 = variants["fp32"]
    assert fp32.parity_path.name == "parity.json"
    accuracy = json.loads(fp32.parity_path.read_text())["accuracy"]
    assert accuracy["keras"] == pytest.approx(accuracy["onnxruntime"])
    assert metadata(open_session(fp32.onnx_path))["accuracy"] == accuracy


def test_accuracy_gate_refuses_a_variant_with_both_figures(deploy_run, tmp_path):
    out = tmp_path / "gated.onnx"
    with pytest.raises(CnnforgeError) as refused:
        export(
            deploy_run,
            out,
            precision="int8",
            max_accuracy_drop=-100.0,
            min_top1_agreement=TEST_MODEL_MIN_AGREEMENT,
        )
    message = str(refused.value)
    assert "int8 variant refused: test accuracy" in message and "with Keras" in message
    assert "--force" in message and "\n" not in message
    assert not out.exists(), "a refused variant is not written"
    assert not (tmp_path / "gated.parity.json").exists(), "no evidence without its model"
    evidence = json.loads((tmp_path / "gated.parity.failed.json").read_text())["accuracy"]
    assert not evidence["passed"] and not evidence["forced"]
    assert f"{evidence['onnxruntime']:.2%}" in message and f"{evidence['keras']:.2%}" in message


def test_force_keeps_a_refused_variant_and_says_so(deploy_run, tmp_path):
    out = tmp_path / "forced.onnx"
    with pytest.warns(CnnforgeWarning, match="accuracy gate"):
        export(
            deploy_run,
            out,
            precision="int8",
            max_accuracy_drop=-100.0,
            force=True,
            min_top1_agreement=TEST_MODEL_MIN_AGREEMENT,
        )
    accuracy = metadata(open_session(out))["accuracy"]
    assert accuracy["forced"] and not accuracy["passed"]


@pytest.fixture(scope="module")
def near_tie_run(deploy_run, tmp_path_factory) -> Path:
    """The test model with its classes nearly tied on every image: the last layer's weights of
    each class brought to within a thousandth of their mean over the classes, so int8's rounding
    must flip some top-1 labels (the test model alone agrees on 96-100 % of them, depending on
    how it happened to train)."""
    import shutil

    import keras

    run_dir = tmp_path_factory.mktemp("near-tie") / "run"
    run_dir.mkdir()
    shutil.copy(deploy_run / "config.json", run_dir / "config.json")
    model = keras.models.load_model(deploy_run / "best.keras")
    last = next(layer for layer in reversed(model.layers) if layer.get_weights())
    last.set_weights(
        [
            w.mean(axis=-1, keepdims=True) + 1e-3 * (w - w.mean(axis=-1, keepdims=True))
            for w in last.get_weights()
        ]
    )
    model.save(run_dir / "best.keras")
    return run_dir


def test_int8_parity_is_judged_on_top1_agreement(near_tie_run, tmp_path):
    with pytest.raises(CnnforgeError, match=r"top-1 agreement .* < 100%"):
        export(near_tie_run, tmp_path / "strict.onnx", precision="int8", min_top1_agreement=1.0)
    assert not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration_images": 5}, "too few calibration images (5)"),
        ({"calibration_images": 10_000}, "has only 360 training images"),
        ({"precision": "int4"}, "unknown precision 'int4'"),
        ({"layout": "CHWN"}, "unknown layout 'CHWN'"),
        ({"precision": "int8", "provider": "tensorrt"}, "provider 'tensorrt' is not available"),
    ],
)
def test_bad_variant_requests_fail_before_anything_is_written(
    deploy_run, tmp_path, kwargs, message
):
    kwargs = {"precision": "int8", **kwargs}
    with pytest.raises(CnnforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export(deploy_run, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_reduced_precision_needs_the_models_data(finished_run, tmp_path):
    lone = tmp_path / "lone.keras"
    lone.write_bytes((finished_run.run_dir / "best.keras").read_bytes())
    with pytest.raises(CnnforgeError, match="int8 export needs the model's own data.*give --data"):
        export(lone, precision="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CnnforgeWarning)
        # images of another size are read as the model's (resized); the classes cannot be
        with pytest.raises(
            CnnforgeError, match=r"fp16 export .*other.npz has 2 classes, the model 10"
        ):
            export(lone, precision="fp16", data=str(_other_shape_npz(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.keras", "other.npz"]


def _other_shape_npz(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "other.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return tmp_path / "other.npz"


def test_export_command_makes_variants_and_refuses_in_one_line(
    deploy_run, near_tie_run, small_npz, tmp_path
):
    from click.testing import CliRunner

    from cnnforge.cli import cli

    out = tmp_path / "int8-nchw.onnx"
    made = CliRunner().invoke(
        cli,
        [
            "export",
            str(deploy_run),
            "-o",
            str(out),
            "--precision",
            "int8",
            "--layout",
            "nchw",
            "--calibration-images",
            "64",
            "--min-agreement",
            str(TEST_MODEL_MIN_AGREEMENT),
        ],
        terminal_width=200,
    )
    assert made.exit_code == 0, made.output + made.stderr
    assert "int8, NCHW, opset 17" in made.output and "accuracy: test accuracy" in made.output
    assert metadata(open_session(out))["calibration"]["images"] == 64
    scored = CliRunner().invoke(cli, ["evaluate", str(out), "--data", str(small_npz)])
    assert scored.exit_code == 0 and "accuracy" in scored.output

    refused = CliRunner().invoke(
        cli,
        [
            "export",
            str(near_tie_run),
            "-o",
            str(tmp_path / "no.onnx"),
            "--precision",
            "int8",
            "--min-agreement",
            "1",
        ],
    )
    assert refused.exit_code == 1 and not (tmp_path / "no.onnx").exists()
    lines = refused.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("Error: export of") and "failed parity" in lines[0]
    )
    too_few = CliRunner().invoke(
        cli, ["export", str(deploy_run), "--precision", "int8", "--calibration-images", "3"]
    )
    assert too_few.exit_code == 1 and "too few calibration images (3)" in too_few.stderr
