""" "Not one of the classes": below the recorded (or a given) confidence, Classifier, `cnnforge
predict` and `cnnforge serve` answer the label `unknown`, say so in their JSON, and keep the
probabilities."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import onnx
import pytest
import serving
from click.testing import CliRunner
from PIL import Image

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.predict import UNKNOWN, Classifier
from cnnforge.deploy.server import create_app


def _images(tmp_path, count: int = 8) -> list:
    rng = np.random.default_rng(3)
    paths = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def images(tmp_path):
    return _images(tmp_path)


@pytest.fixture
def plain(tmp_path):
    return serving.model(tmp_path / "plain.onnx")


def _median_top(model, images) -> float:
    return float(np.median(Classifier(model).probabilities(images).max(axis=1)))


@pytest.fixture
def calibrated(tmp_path, plain, images):
    """The tiny model with a recorded threshold between its images' top probabilities."""
    proto = onnx.load(str(plain))
    entry = proto.metadata_props.add()
    entry.key = "cnnforge.unknown_threshold"
    threshold = {"score": "max_probability", "threshold": _median_top(plain, images)}
    entry.value = json.dumps({**threshold, "acceptance": 0.95, "source": "test"})
    path = plain.parent / "calibrated.onnx"
    onnx.save(proto, str(path))
    return path


def test_classifier_answers_unknown_below_the_recorded_threshold(calibrated, images):
    threshold = json.loads(
        {p.key: p.value for p in onnx.load(str(calibrated)).metadata_props}[
            "cnnforge.unknown_threshold"
        ]
    )["threshold"]
    predictions = Classifier(calibrated, reject_unknown=True).predict(images, top_k=2)
    unknown = [p for p in predictions if p.unknown]
    assert 0 < len(unknown) < len(predictions)
    for p in predictions:
        assert p.unknown == (p.probabilities[0] < threshold)
        answer = p.as_dict()
        assert answer["label"] == (UNKNOWN if p.unknown else p.labels[0])
        assert answer["unknown"] is p.unknown and answer["min_confidence"] == threshold
        assert len(answer["top"]) == 2  # the probabilities stay
    plain_answers = Classifier(calibrated).predict(images, top_k=2)  # not asked: as before
    assert all("unknown" not in p.as_dict() for p in plain_answers)


def test_min_confidence_overrides_and_is_checked(plain, images):
    everything = Classifier(plain, min_confidence=1.0).predict(images)
    assert all(p.unknown for p in everything)
    assert not any(p.unknown for p in Classifier(plain, min_confidence=0.0).predict(images))
    with pytest.raises(CnnforgeError, match="min_confidence must be between 0 and 1"):
        Classifier(plain, min_confidence=1.5)
    with pytest.raises(CnnforgeError, match=r"no threshold.*--calibrate.*--min-confidence"):
        Classifier(plain, reject_unknown=True)


def test_predict_command_reject_unknown(calibrated, plain, images, tmp_path):
    out = tmp_path / "labels.json"
    paths = [str(p) for p in images]
    result = CliRunner().invoke(
        cli, ["predict", str(calibrated), *paths, "--reject-unknown", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert any(entry["label"] == UNKNOWN for entry in written)
    assert "unknown" in result.output
    refused = CliRunner().invoke(cli, ["predict", str(plain), *paths, "--reject-unknown"])
    assert refused.exit_code != 0 and "--min-confidence" in refused.output
    assert "Traceback" not in refused.output
    own = CliRunner().invoke(cli, ["predict", str(plain), paths[0], "--min-confidence", "1"])
    assert own.exit_code == 0 and UNKNOWN in own.output


def test_serve_answers_unknown_and_metadata_shows_the_threshold(calibrated, images):
    threshold = _median_top(calibrated, images)
    with serving.running(create_app(calibrated, reject_unknown=True)) as url:
        files = [("images", (p.name, p.read_bytes())) for p in images]
        answers = httpx.post(f"{url}/predict", files=files).json()["predictions"]
        meta = httpx.get(f"{url}/metadata").json()
    assert {a["unknown"] for a in answers} == {True, False}
    assert all(a["top"] and a["min_confidence"] == threshold for a in answers)
    assert meta["unknown"]["min_confidence"] == threshold
    assert meta["unknown"]["recorded"]["acceptance"] == 0.95


def test_serve_without_rejecting_shows_the_recorded_threshold_unused(calibrated, images):
    with serving.running(create_app(calibrated)) as url:
        body = io.BytesIO(images[0].read_bytes())
        answer = httpx.post(f"{url}/predict", files=[("images", ("a.png", body))]).json()
        meta = httpx.get(f"{url}/metadata").json()
    assert "unknown" not in answer["predictions"][0]
    assert meta["unknown"]["min_confidence"] is None and meta["unknown"]["recorded"]


def test_serve_command_refuses_a_bad_confidence_in_one_line_before_listening(plain):
    result = CliRunner().invoke(
        cli, ["serve", str(plain), "--port", "0", "--min-confidence", "1.5"]
    )
    assert result.exit_code != 0 and "min_confidence must be between 0 and 1" in result.output
    assert "Traceback" not in result.output
    unrecorded = CliRunner().invoke(cli, ["serve", str(plain), "--port", "0", "--reject-unknown"])
    assert unrecorded.exit_code != 0 and "--min-confidence" in unrecorded.output


@pytest.fixture(scope="module")
def scored(finished_run, tmp_path_factory):
    """The finished run's model exported with its temperature and its ``ood_score`` output,
    its recorded threshold moved to the median score of the test images (the test model is too
    weak to reject noise by its own): some images are unknown, some not."""
    import onnxruntime as ort

    from cnnforge.conversion.export import export

    out = tmp_path_factory.mktemp("scored") / "model.onnx"
    export(finished_run.run_dir, out, calibrate=True)
    proto = onnx.load(str(out))
    entry = next(p for p in proto.metadata_props if p.key == "cnnforge.unknown_threshold")
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    pixels = np.stack([np.asarray(Image.open(p), np.float32) for p in _images(out.parent)])
    median = float(np.median(session.run(["ood_score"], {"images": pixels[..., None]})[0]))
    entry.value = json.dumps({**json.loads(entry.value), "threshold": median})
    onnx.save(proto, str(out))
    return out


def test_reject_unknown_uses_the_graphs_ood_score_and_says_so(scored, images):
    import onnxruntime as ort

    recorded = json.loads(
        {p.key: p.value for p in onnx.load(str(scored)).metadata_props}[
            "cnnforge.unknown_threshold"
        ]
    )
    assert recorded["score"] == "knn_cosine" and recorded["output"] == "ood_score"
    classifier = Classifier(scored, reject_unknown=True)
    predictions = classifier.predict(images, top_k=2)
    session = ort.InferenceSession(scored, providers=["CPUExecutionProvider"])
    batch = classifier.batch([classifier.pixels(i) for i in images])
    expected = session.run(["ood_score"], {"images": batch})[0]
    for p, value in zip(predictions, expected, strict=True):
        answer = p.as_dict()
        assert answer["score"] == "knn_cosine" and answer["threshold"] == recorded["threshold"]
        assert answer["score_value"] == pytest.approx(float(value), abs=1e-6)
        assert p.unknown == (value < recorded["threshold"]) and len(answer["top"]) == 2
        assert "min_confidence" not in answer  # the top probability decides nothing here
    assert {p.unknown for p in predictions} == {True, False}
    own = Classifier(scored, min_confidence=0.0).predict(images)  # your own floor: top prob.
    assert not any(p.unknown for p in own) and own[0].as_dict()["score"] == "max_probability"


def test_serve_rejects_by_the_recorded_score_and_metadata_names_it(scored, images):
    with serving.running(create_app(scored, reject_unknown=True)) as url:
        files = [("images", (p.name, p.read_bytes())) for p in images]
        answers = httpx.post(f"{url}/predict", files=files).json()["predictions"]
        meta = httpx.get(f"{url}/metadata").json()
    assert all(a["score"] == "knn_cosine" and "score_value" in a for a in answers)
    assert {a["unknown"] for a in answers} == {True, False}
    assert meta["unknown"]["score"] == "knn_cosine"
    assert meta["unknown"]["threshold"] == meta["unknown"]["recorded"]["threshold"]


def test_the_servers_batch_rows_read_as_their_probabilities(scored, images):
    """Code that reads a served batch as an array (the v2 protocol's outputs) gets the
    probabilities, whatever score the unknown rule carries beside them."""
    from cnnforge.deploy.predict import Rows

    classifier = Classifier(scored, reject_unknown=True)
    batch = classifier.batch([classifier.pixels(i) for i in images])
    rows = classifier.rows(batch)
    assert isinstance(rows, Rows) and rows.scores is not None
    np.testing.assert_array_equal(np.asarray(rows, dtype=np.float32), rows.probabilities)
    assert np.asarray(rows[2:5]).shape == (3, 10) and len(rows[2:5].scores) == 3


def test_the_v2_protocol_answers_the_graphs_ood_score_beside_the_probabilities(scored, images):
    """Triton's own client sees both graph outputs in the metadata and gets both by default;
    the score is the graph's own (as onnxruntime computes it), and a classification of the
    score is refused in one line."""
    import onnxruntime as ort

    http = serving.triton_http()
    pixels = np.stack([np.asarray(Image.open(p), np.uint8) for p in images])[..., None]
    session = ort.InferenceSession(scored, providers=["CPUExecutionProvider"])
    probabilities, scores = session.run(None, {"images": pixels.astype(np.float32)})  # 0-255
    with (
        serving.running(create_app(scored, max_batch=32)) as base,
        http.InferenceServerClient(base.removeprefix("http://")) as client,
    ):
        meta = client.get_model_metadata("model")
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "ood_score"]
        assert meta["outputs"][1] == {"name": "ood_score", "datatype": "FP32", "shape": [-1]}
        tensor = http.InferInput("images", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        answer = client.infer("model", [tensor])
        np.testing.assert_allclose(answer.as_numpy("probabilities"), probabilities, atol=1e-6)
        np.testing.assert_allclose(answer.as_numpy("ood_score"), scores, atol=1e-5)
        only = client.infer("model", [tensor], outputs=[http.InferRequestedOutput("ood_score")])
        assert only.as_numpy("probabilities") is None
        np.testing.assert_allclose(only.as_numpy("ood_score"), scores, atol=1e-5)
        with pytest.raises(http.InferenceServerException, match="classification") as refused:
            client.infer(
                "model", [tensor], outputs=[http.InferRequestedOutput("ood_score", class_count=2)]
            )
        assert "\n" not in str(refused.value)


def test_the_grpc_service_answers_the_graphs_ood_score_too(scored, images):
    import onnxruntime as ort

    triton = pytest.importorskip("tritonclient.grpc")
    pixels = np.stack([np.asarray(Image.open(p), np.uint8) for p in images])[..., None]
    session = ort.InferenceSession(scored, providers=["CPUExecutionProvider"])
    scores = session.run(["ood_score"], {"images": pixels.astype(np.float32)})[0]
    app = create_app(scored, max_batch=32, grpc_address=("127.0.0.1", 0))
    with (
        serving.running(app),
        triton.InferenceServerClient(f"127.0.0.1:{app.state.grpc.port}") as client,
    ):
        outputs = client.get_model_metadata("model", as_json=True)["outputs"]
        assert [o["name"] for o in outputs] == ["probabilities", "ood_score"]
        tensor = triton.InferInput("images", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        np.testing.assert_allclose(
            client.infer("model", [tensor]).as_numpy("ood_score"), scores, atol=1e-5
        )
