"""The Open Inference Protocol's REST routes on a real uvicorn server on a free loopback port:
Triton's own HTTP client (``tritonclient.http``, unchanged) infers with the pixel tensor (UINT8
and FP32, binary and JSON) and with encoded images, and its answers equal ``cnnforge predict``'s;
bad tensors are a 400 with one line; and a hand-built binary body checks the wire format."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import serving
from PIL import Image

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import scale
from cnnforge.deploy.images import load_image
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.server import create_app


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("v2") / "model.onnx")


@pytest.fixture(scope="module")
def url(model):
    with serving.running(create_app(model, max_batch=32, name="fashion")) as base:
        yield base


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five PNG files of the model's size (28×28 grey) and of other sizes and modes."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("v2images")
    shapes = [(28, 28), (28, 28), (40, 31, 3), (28, 28, 4), (17, 50)]
    paths = []
    for i, shape in enumerate(shapes):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def triton(url):
    http = serving.triton_http()
    with http.InferenceServerClient(url.removeprefix("http://")) as client:
        yield http, client


def test_server_and_model_metadata_through_tritonclient(triton):
    http, client = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "cnnforge" and "binary_tensor_data" in server["extensions"]
    assert client.get_model_metadata("fashion") == {
        "name": "fashion",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 28, 28, 1]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get_model_repository_index() == [
        {"name": "fashion", "version": "1", "state": "READY"}
    ]
    for name, version in (("other", ""), ("fashion", "2")):
        with pytest.raises(http.InferenceServerException) as caught:
            client.get_model_metadata(name, version)
        assert caught.value.status() == "404" and "\n" not in caught.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_pixel_tensors_answer_as_predict_does(triton, model, images, datatype, binary):
    http, client = triton
    classifier = Classifier(model)
    expected = classifier.probabilities(images)
    raw = np.stack([load_image(p, classifier.preprocessing).pixels for p in images])
    pixels = raw.astype(np.uint8) if datatype == "UINT8" else scale(raw, classifier.pixel_range)
    tensor = http.InferInput("x", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    output = http.InferRequestedOutput("probabilities", binary_data=binary)
    answer = client.infer("fashion", [tensor], outputs=[output])
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


def test_encoded_images_with_classification_answer_as_predict_does(triton, model, images):
    http, client = triton
    top = Classifier(model).predict(images, top_k=3)
    files = np.array([p.read_bytes() for p in images], dtype=np.object_)
    tensor = http.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(files)
    answer = client.infer(
        "fashion",
        [tensor],
        outputs=[http.InferRequestedOutput("probabilities", class_count=3)],
        model_version="1",
    )
    strings = answer.as_numpy("probabilities")
    assert strings.shape == (len(images), 3)
    for prediction, row in zip(top, strings, strict=True):
        expected = [f"{p:.6f}:{label.removeprefix('class')}:{label}" for label, p in prediction.top]
        assert [s.decode() for s in row] == expected
    plain = client.infer("fashion", [tensor])  # no outputs named: all of them, binary
    expected = Classifier(model).probabilities(images)
    np.testing.assert_allclose(plain.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "shape", "datatype", "says"),
    [
        ("x", [1, 28, 28, 3], "UINT8", "shape [1, 28, 28, 3] does not match the model's"),
        ("x", [1, 28, 28, 1], "INT32", "datatype INT32 is not accepted"),
        ("x", [33, 28, 28, 1], "UINT8", "33 images; send 1 to 32"),
        ("pixels", [1, 28, 28, 1], "FP32", "unknown input 'pixels'"),
        ("image", [1], "BYTES", "cannot decode image bytes"),
    ],
)
def test_bad_tensors_are_a_400_with_one_line(triton, name, shape, datatype, says):
    http, client = triton
    tensor = http.InferInput(name, shape, datatype)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    else:
        tensor.set_data_from_numpy(np.zeros(shape, http.triton_to_np_dtype(datatype)))
    with pytest.raises(http.InferenceServerException) as caught:
        client.infer("fashion", [tensor])
    assert caught.value.status() == "400"
    assert says in caught.value.message() and "\n" not in caught.value.message()


def test_the_binary_extension_on_the_wire(url, model, images):
    """A hand-built body: JSON header, then the raw bytes; the answer's header says where its
    JSON ends and the probabilities' float32 bytes begin."""
    classifier = Classifier(model)
    raw = np.stack([load_image(p, classifier.preprocessing).pixels for p in images[:2]])
    data = raw.astype(np.uint8).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "UINT8",
                    "shape": [2, 28, 28, 1],
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    infer = f"{url}/v2/models/fashion/versions/1/infer"
    length = {"Inference-Header-Content-Length": str(len(header))}
    response = httpx.post(infer, content=header + data, headers=length)
    assert response.status_code == 200
    split = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:split])
    assert answer["model_name"] == "fashion" and answer["model_version"] == "1"
    [output] = answer["outputs"]
    assert output["shape"] == [2, 10] and output["parameters"] == {"binary_data_size": 80}
    probabilities = np.frombuffer(response.content[split:], "<f4").reshape(2, 10)
    expected = classifier.probabilities(images[:2])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)

    short = httpx.post(infer, content=header + data[:-1], headers=length)
    assert short.status_code == 400
    assert short.json() == {
        "error": "input 'x': binary_data_size 1568 is past the 1,567 bytes of binary data "
        "after the JSON header"
    }
    wrong_count = json.loads(header)
    wrong_count["inputs"][0]["parameters"]["binary_data_size"] = len(data) - 1
    body = json.dumps(wrong_count).encode()
    refused = httpx.post(
        infer,
        content=body + data[:-1],
        headers={"Inference-Header-Content-Length": str(len(body))},
    )
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("input 'x': 1,567 bytes of binary data, but shape")
    other = httpx.post(f"{url}/v2/models/other/infer", content=header + data, headers=length)
    assert other.status_code == 404
    assert other.json() == {"error": "unknown model 'other'; this server serves 'fashion'"}
    metrics = httpx.get(f"{url}/metrics").text
    assert 'route="/v2/models/{model}/versions/{version}/infer",status="200"' in metrics
    assert 'route="/v2/models/{model}/infer",status="404"' in metrics


def test_json_inference_as_curl_sends_it(url, model, images):
    """The curl example of docs/deployment.md: a JSON tensor, a JSON answer."""
    classifier = Classifier(model)
    pixels = load_image(images[0], classifier.preprocessing).pixels.astype(np.uint8)
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 28, 28, 1]}]}
    body["inputs"][0]["data"] = pixels.ravel().tolist()
    response = httpx.post(f"{url}/v2/models/fashion/infer", json=body)
    assert response.status_code == 200 and "inference-header-content-length" not in response.headers
    [output] = response.json()["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    expected = classifier.probabilities(images[:1])
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected, atol=1e-6)
    malformed = httpx.post(f"{url}/v2/models/fashion/infer", content=b'{"inputs": [')
    assert malformed.status_code == 400 and "malformed" in malformed.json()["error"]


def test_the_token_guards_v2_but_not_its_health_routes(model, images):
    with serving.running(create_app(model, token="s3cret")) as base:
        assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}
        body["inputs"][0]["data"] = [base64.b64encode(images[0].read_bytes()).decode()]
        infer = f"{base}/v2/models/model/infer"  # named by the file's stem
        assert httpx.post(infer, json=body).status_code == 401
        assert httpx.get(f"{base}/v2/models/model").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        answered = httpx.post(infer, json=body, headers=auth)
        assert answered.status_code == 200, answered.text


def test_a_model_name_that_is_no_path_segment_is_refused(model):
    with pytest.raises(CnnforgeError, match="cannot be a URL path segment"):
        create_app(model, name="a/b")


def test_v2_shares_the_queue_and_body_limits_of_predict(model):
    app = create_app(model, max_queue=1, max_body=1000)
    infer = "/v2/models/model/infer"
    with serving.running(app) as base:
        too_large = httpx.post(f"{base}{infer}", content=b"{" + b" " * 2000 + b"}")
        assert too_large.status_code == 413 and "over 1,000 bytes" in too_large.json()["error"]
        app.state.service.arriving = 1  # as if another request were being decoded
        full = httpx.post(f"{base}{infer}", content=b"{}")
        app.state.service.arriving = 0
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "queue is full" in full.json()["error"]
