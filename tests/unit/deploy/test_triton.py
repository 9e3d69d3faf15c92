"""The Triton model repository: config.pbtxt parsed with Triton's own model-config protobuf
schema (tritonclient ships it; no Triton server runs here), the model and the labels file."""

from __future__ import annotations

import os

import pytest
import serving
import tiny_onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.triton import write_triton_repository


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_layout_and_config_from_the_model(tmp_path):
    model = serving.model(tmp_path / "fashion.onnx")
    folder = write_triton_repository(model, tmp_path / "repo", max_batch=16)
    assert folder == tmp_path / "repo" / "fashion"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert (folder / "labels.txt").read_text().splitlines() == serving.CLASSES
    config = parse(folder / "config.pbtxt")
    assert config.name == "fashion" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (graph_input,) = config.input
    assert graph_input.name == "x" and list(graph_input.dims) == [28, 28, 1]
    assert graph_input.data_type == model_config_pb2.TYPE_FP32
    (graph_output,) = config.output
    assert graph_output.name == "probabilities" and list(graph_output.dims) == [10]
    assert graph_output.label_filename == "labels.txt"


def test_a_fixed_batch_model_has_no_dynamic_batching(tmp_path):
    model = tiny_onnx.save(tiny_onnx.conv_classifier(batch=2, layout="NCHW"), tmp_path / "m.onnx")
    folder = write_triton_repository(model, tmp_path / "repo", name="fixed")
    config = parse(folder / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 3, 16, 16]
    assert not (folder / "labels.txt").exists()  # no class names in its metadata


def test_rewriting_replaces_the_folder_whole_and_leaves_no_temporary(tmp_path):
    model = serving.model(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    folder = write_triton_repository(model, repo)
    (folder / "stale.txt").write_text("from an older export")
    write_triton_repository(model, repo)
    assert not (folder / "stale.txt").exists()
    assert os.listdir(repo) == ["m"]


def test_bad_names_and_inputs_are_one_line(tmp_path):
    model = serving.model(tmp_path / "m.onnx")
    with pytest.raises(CnnforgeError, match="Triton model name"):
        write_triton_repository(model, tmp_path / "repo", name="../escape")
    with pytest.raises(CnnforgeError, match="does not exist"):
        write_triton_repository(tmp_path / "missing.onnx", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_export_triton_max_batch_defaults_to_the_triton_constant():
    from cnnforge.cli.export_command import export
    from cnnforge.deploy.triton import DEFAULT_MAX_BATCH

    (option,) = [p for p in export.params if p.name == "triton_max_batch"]
    assert option.default is DEFAULT_MAX_BATCH


def test_a_per_image_score_output_is_one_dim_reshaped_to_none(tmp_path):
    """A calibrated export's ``ood_score`` has the batch axis only: Triton takes it as dims
    [1] reshaped to [] (its rule for outputs with no dims but the batch)."""
    import numpy as np
    import onnx

    from cnnforge.conversion.calibrate import with_knn_score

    model = serving.model(tmp_path / "fashion.onnx")
    bank = np.eye(10, dtype=np.float32)[:5]
    scored = with_knn_score(onnx.load(str(model)), "probabilities", bank, 2)
    onnx.save(scored, str(model))
    config = parse(write_triton_repository(model, tmp_path / "repo") / "config.pbtxt")
    probabilities, score = config.output
    assert probabilities.name == "probabilities" and probabilities.label_filename
    assert score.name == "ood_score" and list(score.dims) == [1]
    assert score.HasField("reshape") and list(score.reshape.shape) == []
    assert not score.label_filename
