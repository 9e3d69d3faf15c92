"""`cnnforge inspect`: what a model file is, from the file alone."""

from __future__ import annotations

import json

import onnx
from click.testing import CliRunner

from cnnforge.cli import cli
from cnnforge.deploy import onnxinfo
from cnnforge.deploy.inspect import inspect_model


def test_inspect_an_int8_variant(variants, small_npz):
    path = variants["int8"].onnx_path
    info = inspect_model(path)
    assert info.size_bytes == path.stat().st_size and info.opset == 17
    assert info.producer.startswith("cnnforge ")
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("images", "float32", ("batch", 28, 28, 1))
    ]
    assert [(t.name, t.shape) for t in info.outputs] == [("probabilities", ("batch", 10))]
    assert info.operators["QuantizeLinear"] > 0 and info.operators["Conv"] >= 1
    assert info.parameters == sum(info.parameters_by_type.values())
    assert info.parameters_by_type["int8"] > 0
    assert info.flops_per_image == onnxinfo.flops_per_image(variants["fp32"].onnx_path) > 0
    meta = info.metadata
    assert meta["precision"] == "int8" and meta["input_layout"] == "NHWC"
    assert meta["pixel_range"] == [0, 255] and len(meta["class_names"]) == 10
    assert meta["source"].endswith("best.keras") and meta["run"]
    assert meta["accuracy"]["data"] == small_npz.name


def test_inspect_command_prints_every_fact_and_writes_json(variants, tmp_path):
    out = tmp_path / "facts.json"
    path = variants["int8"].onnx_path
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in (
        "images: float32 [batch, 28, 28, 1]",
        "probabilities: float32 [batch, 10]",
        "opset 17",
        "QuantizeLinear",
        "int8",
        "FLOPs/image",
        "MB",
        "class_names",
        "T-shirt/top",
        "pixel_range",
        "input_layout",
        "precision",
        "source",
        "accuracy",
        "calibration",
    ):
        assert text in result.output, text
    assert json.loads(out.read_text())["metadata"]["precision"] == "int8"


def test_inspect_a_model_from_another_exporter(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, producer_name="elsewhere")
    helper.set_model_props(model, {"author": "someone"})
    onnx.save(model, tmp_path / "other.onnx")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "other.onnx")])
    assert result.exit_code == 0, result.output
    assert "no cnnforge metadata" in result.output and "someone" in result.output
    info = inspect_model(tmp_path / "other.onnx")
    assert info.metadata == {} and info.other_metadata == {"author": "someone"}
    assert info.flops_per_image == 0 and info.parameters == 0


def test_inspect_a_missing_or_broken_file_is_one_line(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    for path in (tmp_path / "missing.onnx", tmp_path / "broken.onnx"):
        result = CliRunner().invoke(cli, ["inspect", str(path)])
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
