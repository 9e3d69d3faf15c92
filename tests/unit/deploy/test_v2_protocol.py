"""The Open Inference Protocol's core, no web framework: tensors from JSON and binary data
(byte counts checked), the model's metadata, and ``infer`` on a real model and batcher (pixel
tensors as one job, encoded images decoded as /predict does, Triton's classification
strings)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import struct
import weakref

import numpy as np
import pytest
import serving
from PIL import Image

from cnnforge.core.preprocessing import scale
from cnnforge.deploy import v2_protocol as v2
from cnnforge.deploy import v2_rest
from cnnforge.deploy.batching import Overloaded
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.serve_service import Service


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("v2") / "model.onnx")


def service_of(model, **options) -> Service:
    settings = dict(max_batch=32, max_wait_ms=1, max_queue=8, threads=1, max_body=2**20)
    return Service(model, provider="cpu", **(settings | options))


def run_infer(service: Service, *requests):
    """``infer`` for each (inputs, outputs) in one event loop (a batcher lives in one)."""

    async def main():
        service.batcher.start()
        try:
            return [await v2.infer(service, *request) for request in requests]
        finally:
            await service.batcher.stop()

    answers = asyncio.run(main())
    return answers[0] if len(answers) == 1 else answers


def test_tensors_from_json_and_bytes_keep_shape_and_datatype():
    grid = [[1, 2, 3], [4, 5, 6]]
    from_json = v2.tensor_from_json("x", "UINT8", [2, 3], grid)
    assert from_json.dtype == np.uint8 and from_json.tolist() == grid
    flat = v2.tensor_from_json("x", "FP32", [2, 3], [0.5] * 6)
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    raw = np.arange(6, dtype="<f4").tobytes()
    from_bytes = v2.tensor_from_bytes("x", "FP32", [3, 2], raw)
    assert from_bytes.shape == (3, 2) and from_bytes[2, 1] == 5.0
    assert not from_bytes.flags.owndata  # read in place, not copied
    items = [b"\x89PNG", b"", b"abc"]
    wire = v2.bytes_tensor_to_wire(items)
    assert wire[:4] == struct.pack("<I", 4)
    assert v2.tensor_from_bytes("img", "BYTES", [3], wire) == items
    encoded = [base64.b64encode(item).decode() for item in items]
    assert v2.tensor_from_json("img", "BYTES", [3], encoded) == items


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "says"),
    [
        ("FP32", [2, 3], b"\0" * 23, "23 bytes of binary data, but shape [2, 3] of FP32 is 24"),
        ("UINT8", [4], b"\0" * 5, "5 bytes of binary data, but shape [4] of UINT8 is 4"),
        ("BYTES", [2], struct.pack("<I", 3) + b"abc", "holds 1 BYTES element, shape [2] needs 2"),
        ("BYTES", [1], struct.pack("<I", 9) + b"abc", "element 0 says 9 bytes but only 3 follow"),
        ("BYTES", [1], struct.pack("<I", 1) + b"ab", "1 stray bytes"),
        ("FP32", [-1, 3], b"", "shape must be a list of whole numbers"),
        ("COMPLEX", [1], b"", "datatype 'COMPLEX' is not one of"),
    ],
)
def test_binary_data_that_does_not_fit_its_shape_is_one_line(datatype, shape, raw, says):
    with pytest.raises(v2.ProtocolError, match="^input 'x': ") as caught:
        v2.tensor_from_bytes("x", datatype, shape, raw)
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("datatype", "data", "says"),
    [
        ("UINT8", [1, 2, 3], "3 values for shape [2, 2] of UINT8"),
        ("UINT8", [1, 2, 3, 300], "UINT8 values must be from 0 to 255"),
        ("UINT8", [1, 2, 3, 0.5], "(it needs 4 whole numbers)"),
        ("FP32", ["a", "b", "c", "d"], "data that is no numbers"),
        ("FP32", [[1, 2], [3]], "not a regular array of numbers"),
        ("BYTES", ["not base64!", "", "", ""], "BYTES data in JSON must be base64"),
    ],
)
def test_json_data_that_does_not_fit_is_one_line(datatype, data, says):
    with pytest.raises(v2.ProtocolError, match="^input 'x': ") as caught:
        v2.tensor_from_json("x", datatype, [2, 2], data)
    assert says in str(caught.value)


def test_model_and_server_metadata(model):
    spec = v2.model_spec(Classifier(model), "fashion")
    assert spec.as_dict() == {
        "name": "fashion",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 28, 28, 1]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert spec.inputs[0].accepts == ("FP32", "UINT8")
    metadata = v2.server_metadata()
    assert metadata["name"] == "cnnforge"
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(
        metadata["extensions"]
    )


def test_a_pixel_tensor_is_one_batcher_job_and_never_decoded(model, monkeypatch):
    service = service_of(model)
    jobs = []
    submit = service.batcher.submit

    async def counting(batch):
        jobs.append(len(batch))
        return await submit(batch)

    monkeypatch.setattr(service.batcher, "submit", counting)
    monkeypatch.setattr(service, "pixels", lambda images: pytest.fail("decoded a tensor"))
    raw = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    [as_uint8], [as_fp32] = run_infer(service, ({"x": raw},), ({"x": scale(raw, (0, 1))},))
    expected = service.classifier.run(scale(raw, (0, 1)))
    assert jobs == [32, 32]
    assert as_uint8.name == "probabilities" and as_uint8.datatype == "FP32"
    assert as_uint8.shape == (32, 10)
    np.testing.assert_allclose(as_uint8.array, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_fp32.array, expected, rtol=1e-5, atol=1e-6)


def test_encoded_images_answer_as_predict_does_with_triton_classification_strings(model):
    rng = np.random.default_rng(1)
    pictures = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    files = [serving.png(p) for p in pictures]
    classifier = Classifier(model)
    expected = classifier.probabilities([Image.open(io.BytesIO(f)) for f in files])
    outputs = [v2.OutputRequest("probabilities"), v2.OutputRequest("probabilities", 3)]
    [probabilities, top] = run_infer(service_of(model), ({"image": files}, outputs))
    np.testing.assert_allclose(probabilities.array, expected, rtol=1e-5, atol=1e-6)
    assert top.datatype == "BYTES" and top.shape == (3, 3)
    for row, strings in zip(expected, top.array, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        assert [s.decode() for s in strings] == [f"{row[i]:.6f}:{i}:class{i}" for i in best]
    assert v2.output_data(top)[0] == top.array[0, 0].decode()
    wire = v2.output_wire(top)
    assert v2.tensor_from_bytes("out", "BYTES", [9], wire) == list(top.array.ravel())


@pytest.mark.parametrize(
    ("inputs", "outputs", "says"),
    [
        ({}, (), "send exactly one input, 'x' (pixels) or 'image' (image files); got 0"),
        ({"pixels": np.zeros((1, 28, 28, 1), np.float32)}, (), "unknown input 'pixels'"),
        (
            {"x": np.zeros((1, 28, 28, 1), np.float32), "image": [b"x"]},
            (),
            "send exactly one input",
        ),
        ({"x": np.zeros((1, 28, 28, 1), np.int32)}, (), "datatype INT32 is not accepted"),
        ({"x": [b"png"]}, (), "datatype BYTES is not accepted"),
        ({"image": np.zeros((1, 4), np.uint8)}, (), "datatype UINT8 is not accepted"),
        ({"x": np.zeros((1, 28, 28, 3), np.uint8)}, (), "shape [1, 28, 28, 3] does not"),
        ({"x": np.zeros((28, 28, 1), np.uint8)}, (), "shape [28, 28, 1] does not"),
        ({"x": np.zeros((33, 28, 28, 1), np.uint8)}, (), "33 images; send 1 to 32"),
        ({"x": np.zeros((0, 28, 28, 1), np.uint8)}, (), "0 images; send 1 to 32"),
        ({"x": np.full((1, 28, 28, 1), np.nan, np.float32)}, (), "NaN or infinity"),
        ({"image": [b"not an image"]}, (), "image[0]: cannot decode image bytes"),
        (
            {"x": np.zeros((1, 28, 28, 1), np.uint8)},
            [v2.OutputRequest("logits")],
            "unknown output 'logits'",
        ),
    ],
)
def test_bad_requests_are_one_line(model, inputs, outputs, says):
    with pytest.raises(v2.ProtocolError) as caught:
        run_infer(service_of(model), (inputs, outputs))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_output_parameters_are_checked():
    assert v2.output_request("p", {"classification": 2, "binary_data": True}) == (
        v2.OutputRequest("p", 2, True)
    )
    assert v2.output_request("p", {}, binary=True).binary
    for bad in (0, -1, True, "3", 1.5):
        with pytest.raises(v2.ProtocolError, match="classification must be a whole number"):
            v2.output_request("p", {"classification": bad})


def test_a_rest_body_with_binary_inputs_and_outputs_round_trips():
    header = v2_rest.dumps(
        {
            "id": "7",
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": 4},
                }
            ],
            "outputs": [{"name": "p", "parameters": {"binary_data": True}}],
        }
    )
    request = v2_rest.parse_rest_request(header + bytes([1, 2, 3, 4]), str(len(header)))
    assert request.id == "7" and request.inputs["images"].tolist() == [[1, 2], [3, 4]]
    assert request.outputs == [v2.OutputRequest("p", None, True)]
    rows = np.array([[0.25, 0.75]], np.float32)
    body, split = v2_rest.rest_response("m", request, [v2.OutputTensor("p", "FP32", (1, 2), rows)])
    answer = v2_rest.loads(body[:split])
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert answer["model_name"] == "m" and answer["id"] == "7"
    assert np.frombuffer(body[split:], "<f4").tolist() == [0.25, 0.75]
    for bad_length in ("x", "99999", "-1"):
        with pytest.raises(v2.ProtocolError, match="Inference-Header-Content-Length must be"):
            v2_rest.parse_rest_request(header, bad_length)
    with pytest.raises(v2.ProtocolError, match="3 bytes after the JSON header belong to no"):
        v2_rest.parse_rest_request(header + bytes(7), str(len(header)))
    with pytest.raises(v2.ProtocolError, match="malformed"):
        v2_rest.parse_rest_request(b"{nope", None)


def test_a_full_queue_is_overloaded_before_anything_is_prepared(model, monkeypatch):
    service = service_of(model, max_queue=1)
    service.arriving = 1  # another request being decoded fills the queue of one
    monkeypatch.setattr(service, "pixels", lambda images: pytest.fail("decoded when full"))
    with pytest.raises(Overloaded):
        run_infer(service, ({"image": [b"png"]}, ()))


def test_the_metadata_cache_does_not_keep_a_classifier_alive(model):
    classifier = Classifier(model)
    v2.model_spec(classifier, "m")
    gone = weakref.ref(classifier)
    del classifier
    gc.collect()
    assert gone() is None
