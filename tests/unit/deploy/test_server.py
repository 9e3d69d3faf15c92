"""`cnnforge serve`'s app on a real uvicorn server on a free loopback port, with a real HTTP
client: answers equal `cnnforge predict`'s, every hostile request is a 4xx with one line and the
server goes on, the token, the bounded queue, metrics, metadata and OpenAPI."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import serving
from PIL import Image

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.server import create_app


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("serve") / "model.onnx")


@pytest.fixture(scope="module")
def url(model):
    with serving.running(create_app(model, max_batch=4, max_body=300_000)) as base:
        yield base


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Images of every size and mode the model does not take, one turned by EXIF."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("images")
    pixels = rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)
    sideways = Image.fromarray(pixels)
    exif = sideways.getexif()
    exif[0x0112] = 6  # rotate 90° to be upright
    files = {
        "rgb.png": encode(Image.fromarray(pixels)),
        "gray.png": encode(Image.fromarray(pixels[..., 0])),
        "native.png": encode(Image.fromarray(pixels[:28, :28, 1])),
        "rgba.png": encode(Image.fromarray(np.dstack([pixels, pixels[..., :1]]))),
        "palette.gif": encode(Image.fromarray(pixels).convert("P"), "GIF"),
        "photo.jpg": encode(Image.fromarray(pixels), "JPEG", quality=90),
        "sideways.jpg": encode(sideways, "JPEG", exif=exif),
    }
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def assert_same(answer: dict, expected) -> None:
    assert [t["label"] for t in answer["top"]] == list(expected.labels)
    np.testing.assert_allclose(
        [t["probability"] for t in answer["top"]], expected.probabilities, rtol=1e-5, atol=1e-7
    )


def test_answers_equal_cnnforge_predict_for_the_same_files(model, url, image_files):
    expected = Classifier(model).predict(image_files, top_k=3)
    for group in (image_files[:4], image_files[4:]):  # multipart, several images at once
        files = [("images", (p.name, p.read_bytes())) for p in group]
        response = httpx.post(f"{url}/predict?top_k=3", files=files)
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        assert [a["image"] for a in answers] == [p.name for p in group]
        for answer, path in zip(answers, group, strict=True):
            assert_same(answer, expected[image_files.index(path)])
    for path, want in zip(image_files, expected, strict=True):  # raw bytes, one image each
        kind = "image/jpeg" if path.suffix == ".jpg" else "application/octet-stream"
        response = httpx.post(
            f"{url}/predict?top_k=3", content=path.read_bytes(), headers={"content-type": kind}
        )
        assert response.status_code == 200, response.text
        assert_same(response.json()["predictions"][0], want)


def bomb(width: int, height: int) -> bytes:
    """A tiny PNG that decodes to width × height pixels."""
    return encode(Image.new("1", (width, height)), optimize=True)


@pytest.fixture(scope="module")
def hostile(image_files):
    good = image_files[0].read_bytes()
    limit = Image.MAX_IMAGE_PIXELS
    return {
        "not an image": ({"content": b"hello, world" * 10, "headers": _raw}, 422, "cannot decode"),
        "truncated": ({"content": good[: len(good) // 2], "headers": _raw}, 422, "truncated"),
        "bomb over the limit": (
            {"content": bomb(limit // 10_000 + 100, 10_000), "headers": _raw},
            422,
            "decompression bomb",
        ),
        "bomb over twice the limit": (
            {"content": bomb(2 * limit // 10_000 + 100, 10_000), "headers": _raw},
            422,
            "decompression bomb",
        ),
        "body over the limit": (
            {"content": b"\0" * 300_001, "headers": _raw},
            413,
            "over 300,000 bytes",
        ),
        "too many images": (
            {"files": [("images", (f"{i}.png", good)) for i in range(5)]},
            413,
            "at most 4",
        ),
        "wrong content type": (
            {"content": b"{}", "headers": {"content-type": "application/json"}},
            415,
            "not accepted",
        ),
        "no content type": ({"content": good}, 415, "not accepted"),
        "empty body": ({"content": b"", "headers": _raw}, 400, "empty"),
        "malformed form": (
            {
                "content": b"--xyz\r\nContent-Disposition: form-data\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
            400,
            "",
        ),
        "form without files": (
            {
                "content": b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--xyz--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
            400,
            "no file",
        ),
    }


_raw = {"content-type": "application/octet-stream"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "truncated",
        "bomb over the limit",
        "bomb over twice the limit",
        "body over the limit",
        "too many images",
        "wrong content type",
        "no content type",
        "empty body",
        "malformed form",
        "form without files",
    ],
)
def test_hostile_requests_are_a_4xx_with_one_line_and_the_server_goes_on(
    url, hostile, image_files, case
):
    request, status, fragment = hostile[case]
    response = httpx.post(f"{url}/predict", **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error and "\n" not in error and "Traceback" not in error
    ok = httpx.post(f"{url}/predict", content=image_files[0].read_bytes(), headers=_raw)
    assert ok.status_code == 200


def test_bad_top_k_and_unknown_routes(url, image_files):
    data = image_files[0].read_bytes()
    for bad in ("0", "-1", "x"):
        response = httpx.post(f"{url}/predict?top_k={bad}", content=data, headers=_raw)
        assert response.status_code == 400 and "top_k" in response.json()["error"]
    many = httpx.post(f"{url}/predict?top_k=99", content=data, headers=_raw).json()
    assert len(many["predictions"][0]["top"]) == 10  # every class, as predict does
    wrong_method, unknown = httpx.get(f"{url}/predict"), httpx.get(f"{url}/nowhere")
    assert wrong_method.status_code == 405 and wrong_method.json() == {
        "error": "Method Not Allowed"
    }
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}


def test_metadata_metrics_and_openapi(url, image_files):
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["classes"] == serving.CLASSES
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["height"] == 28
    assert meta["precision"] == "fp32" and meta["metrics"] == {"accuracy": {"onnx": 0.5}}
    assert meta["limits"] == {"max_images": 4, "max_body_bytes": 300_000}
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    files = [("images", (f"{i}.png", image_files[0].read_bytes())) for i in range(3)]
    assert httpx.post(f"{url}/predict", files=files).status_code == 200
    httpx.post(f"{url}/predict", content=b"junk", headers=_raw)
    text = httpx.get(f"{url}/metrics").text
    assert 'cnnforge_requests_total{route="/predict",status="200"}' in text
    assert 'cnnforge_errors_total{reason="bad_image"}' in text
    assert "cnnforge_batch_size_bucket" in text and "cnnforge_request_seconds_bucket" in text
    count = next(line for line in text.splitlines() if line.startswith("cnnforge_images_total"))
    assert float(count.split()[-1]) >= 3
    spec = httpx.get(f"{url}/openapi.json").json()
    assert set(spec["paths"]) == {"/predict", "/health", "/metadata", "/metrics", "/openapi.json"}
    assert {"400", "413", "415", "422", "503"} <= set(
        spec["paths"]["/predict"]["post"]["responses"]
    )


def test_token_is_needed_everywhere_but_health(model, image_files):
    with serving.running(create_app(model, token="s3cret")) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for route in ("/metadata", "/metrics", "/openapi.json"):
                response = httpx.get(f"{base}{route}", headers=headers)
                assert response.status_code == 401, (route, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            refused = httpx.post(
                f"{base}/predict", content=image_files[0].read_bytes(), headers={**_raw, **headers}
            )
            assert refused.status_code == 401 and "token" in refused.json()["error"]
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/metadata", headers=auth).status_code == 200
        response = httpx.post(
            f"{base}/predict", content=image_files[0].read_bytes(), headers={**_raw, **auth}
        )
        assert response.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(tmp_path, image_files):
    # a model slow enough (512×512 input) that requests pile up behind a one-image batch
    slow = serving.model(tmp_path / "slow.onnx", size=512, channels=3)
    app = create_app(slow, max_batch=1, max_wait_ms=0, max_queue=1)
    data = image_files[0].read_bytes()
    with serving.running(app) as base, httpx.Client(timeout=60) as client:

        def call(_):
            return client.post(f"{base}/predict", content=data, headers=_raw)

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(call, range(48)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        refused = [r for r in responses if r.status_code == 503]
        assert refused and 200 in statuses, statuses
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert "queue is full" in refused[0].json()["error"]
        assert call(0).status_code == 200  # and it recovers


def test_a_bad_model_fails_before_anything_listens(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(CnnforgeError, match="broken.onnx.*complete .onnx file"):
        create_app(tmp_path / "broken.onnx")
