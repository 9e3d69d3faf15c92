"""`cnnforge serve`'s app on a real uvicorn server on a free loopback port, with a real HTTP
client: answers equal `cnnforge predict`'s, every hostile request is a 4xx with one line and the
server goes on, the token, the bounded queue, metrics, metadata and OpenAPI."""

from __future__ import annotations

import io
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import serving
from PIL import Image

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.server import DEFAULT_MAX_PIXELS, create_app


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


def test_an_eps_body_is_a_415_naming_the_format_and_ghostscript_never_runs(
    url, image_files, postscript
):
    eps = {"content-type": "image/x-eps"}
    for request in (
        {"content": postscript, "headers": eps},
        {"files": [("images", ("drawing.eps", postscript))]},
    ):
        response = httpx.post(f"{url}/predict", **request)
        assert response.status_code == 415, response.text
        error = response.json()["error"]
        assert "EPS" in error and "PNG, JPEG, BMP, GIF, TIFF or WebP" in error
    assert 'cnnforge_errors_total{reason="image_format"} 2.0' in httpx.get(f"{url}/metrics").text
    ok = httpx.post(f"{url}/predict", content=image_files[0].read_bytes(), headers=_raw)
    assert ok.status_code == 200


def test_bad_top_k_and_unknown_routes(url, image_files):
    data = image_files[0].read_bytes()
    # a superscript or Arabic-Indic digit passes str.isdigit; 5,000 digits pass int()'s limit
    for bad in ("0", "-1", "x", "\u00b2", "\u0661", "9" * 5000, "1e3", " 3"):
        response = httpx.post(f"{url}/predict", params={"top_k": bad}, content=data, headers=_raw)
        assert response.status_code == 400, (bad[:20], response.text)
        error = response.json()["error"]
        assert "top_k" in error and "\n" not in error and len(error) < 200
    many = httpx.post(f"{url}/predict?top_k=99", content=data, headers=_raw).json()
    assert len(many["predictions"][0]["top"]) == 10  # every class, as predict does
    wrong_method, unknown = httpx.get(f"{url}/predict"), httpx.get(f"{url}/nowhere")
    assert wrong_method.status_code == 405 and wrong_method.json() == {
        "error": "Method Not Allowed"
    }
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}


def test_metadata_metrics_and_openapi(url, model, image_files):
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["classes"] == serving.CLASSES
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["height"] == 28
    assert meta["precision"] == "fp32" and meta["metrics"] == {"accuracy": {"onnx": 0.5}}
    assert meta["limits"] == {
        "max_images": 4,
        "max_body_bytes": 300_000,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "body_timeout_s": 30.0,
    }
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
    served = {route.path for route in create_app(model).routes}  # kept in step with the routes
    assert set(spec["paths"]) == served and "/v2/models/{model}/infer" in served
    assert {"400", "408", "413", "415", "422", "500", "503"} <= set(
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


def half_sent(port: int, body: bytes) -> socket.socket:
    """A raw-bytes request whose headers and first half of the body are sent, the rest not."""
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(head.encode() + body[: len(body) // 2])
    return connection


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_server_refuses_before_reading_the_body(model, image_files):
    app = create_app(model, max_queue=1)
    service = app.state.service
    decode, release = service.pixels, threading.Event()

    def held(images):  # the real decoder, once the test lets it go on
        release.wait(30)
        return decode(images)

    service.pixels = held
    data = image_files[0].read_bytes()
    with serving.running(app) as base, ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{base}/predict", content=data, headers=_raw, timeout=30)
        wait_for(lambda: service.arriving == 1)  # read, being decoded: the queue is full
        port = int(base.rsplit(":", 1)[1])
        with stalled_upload(port) as connection:  # headers only: no body is awaited
            refused = connection.recv(65536)
        release.set()
        assert first.result().status_code == 200
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused, refused[:200]
    assert b"queue is full" in refused


def stalled_upload(port: int) -> socket.socket:
    """A connection that sends a request's headers, Content-Length included, and then none of
    its body."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    return connection


def answer_and_close(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with connection:
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_stalled_uploads_do_not_lock_out_other_clients_and_are_closed(model, image_files):
    app = create_app(model, max_queue=8, body_timeout=2)
    service = app.state.service
    data = image_files[0].read_bytes()
    with serving.running(app) as base, httpx.Client(timeout=10) as client:
        port = int(base.rsplit(":", 1)[1])
        started = time.monotonic()
        stalled = [stalled_upload(port) for _ in range(40)]  # 5× the queue
        wait_for(lambda: service.receiving == 40)
        statuses = [
            client.post(f"{base}/predict", content=data, headers=_raw).status_code
            for _ in range(20)
        ]
        assert statuses == [200] * 20
        assert service.receiving == 40 and time.monotonic() - started < 2  # still stalled
        answers = [answer_and_close(c) for c in stalled]
        waited = time.monotonic() - started
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
    assert b"no body byte for 2 s" in answers[0] and b"connection: close" in answers[0]
    assert 2 <= waited < 10  # closed after the body timeout, not held on
    assert service.receiving == 0 and service.body_bytes == 0


def test_bodies_being_received_are_bounded_in_bytes(model, image_files):
    app = create_app(model, max_queue=1, max_body=1000)  # bodies: at most 1 × 1,000 bytes
    service = app.state.service
    data = image_files[0].read_bytes()
    with serving.running(app) as base:
        port = int(base.rsplit(":", 1)[1])
        connection = half_sent(port, b"\0" * 1000)
        wait_for(lambda: service.body_bytes == 500)
        refused = httpx.post(f"{base}/predict", content=b"\0" * 600, headers=_raw)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "bodies being received fill the server's 1,000 bytes" in refused.json()["error"]
        assert service.body_bytes == 500  # the refused body's bytes are given back
        connection.sendall(b"\0" * 500)
        with connection:
            assert connection.recv(65536).startswith(b"HTTP/1.1 422")  # zeros: no image
        small = Image.new("L", (28, 28))
        assert httpx.post(f"{base}/predict", content=encode(small), headers=_raw).status_code == 200
    assert service.body_bytes == 0 and len(data) > 1000


def test_a_client_leaving_mid_upload_is_counted_not_logged_as_a_failure(model, caplog):
    app = create_app(model)
    with serving.running(app) as base:
        half_sent(int(base.rsplit(":", 1)[1]), b"\0" * 2000).close()
        wait_for(lambda: 'reason="disconnected"' in httpx.get(f"{base}/metrics").text)
    assert "/predict failed" not in caplog.text and app.state.service.arriving == 0


def test_images_over_the_servers_pixel_limit_are_refused_before_decoding(model):
    assert DEFAULT_MAX_PIXELS * 4 < Image.MAX_IMAGE_PIXELS  # well below Pillow's own limit
    with serving.running(create_app(model, max_pixels=10_000)) as base:
        large = encode(Image.new("L", (101, 100)))
        response = httpx.post(f"{base}/predict", content=large, headers=_raw)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert "101×100" in error and "limit of 10,000 pixels" in error
        small = encode(Image.new("L", (100, 100)))
        assert httpx.post(f"{base}/predict", content=small, headers=_raw).status_code == 200


def test_decoding_is_bounded_however_many_requests_arrive(model):
    app = create_app(model, decoders=1)
    service = app.state.service
    decode, active, most = service.pixels, [0], [0]
    lock = threading.Lock()

    def counted(images):  # the real decoder, counting how many run at once
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return decode(images)
        finally:
            with lock:
                active[0] -= 1

    service.pixels = counted
    rng = np.random.default_rng(2)
    data = encode(Image.fromarray(rng.integers(0, 256, (600, 600), dtype=np.uint8)))
    with (
        serving.running(app) as base,
        httpx.Client(timeout=60) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        statuses = list(
            pool.map(
                lambda _: client.post(f"{base}/predict", content=data, headers=_raw).status_code,
                range(16),
            )
        )
    assert statuses == [200] * 16
    assert most[0] == 1


def test_a_model_with_a_fixed_batch_size_serves_concurrent_requests(tmp_path, image_files):
    one = serving.model(tmp_path / "one.onnx", batch=1)
    with pytest.warns(CnnforgeWarning, match="batches of exactly 1 image;"):
        app = create_app(one, max_batch=8, max_wait_ms=20)
    data = [p.read_bytes() for p in image_files]
    with serving.running(app) as base, httpx.Client(timeout=60) as client:
        assert httpx.get(f"{base}/metadata").json()["limits"]["max_images"] == 1

        def call(n):
            return client.post(f"{base}/predict", content=data[n % len(data)], headers=_raw)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, range(24)))
        assert [r.status_code for r in responses] == [200] * 24, responses[0].text
    # a fixed batch of 4: a lone request is padded to it, and answers as the open model does
    four = serving.model(tmp_path / "four.onnx", batch=4)
    expected = Classifier(serving.model(tmp_path / "open.onnx")).predict(image_files, top_k=3)
    with pytest.warns(CnnforgeWarning, match="batches of exactly 4 images;"):
        app = create_app(four)
    with serving.running(app) as base:
        files = [("images", (p.name, p.read_bytes())) for p in image_files[:2]]
        response = httpx.post(f"{base}/predict?top_k=3", files=files)
        assert response.status_code == 200, response.text
        for answer, want in zip(response.json()["predictions"], expected[:2], strict=False):
            assert_same(answer, want)


def failing_over_one_image(path):
    """The test classifier, but its graph reshapes the answer to one row: onnxruntime fails at
    run time on a batch of two or more (as a model with a broken batch axis does)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(serving.model(path)))
    graph = proto.graph
    graph.node[-1].output[0] = "softmax"
    graph.initializer.append(numpy_helper.from_array(np.array([1, 10], np.int64), "one_row"))
    graph.node.append(helper.make_node("Reshape", ["softmax", "one_row"], ["probabilities"]))
    onnx.save(proto, str(path))
    return path


def test_an_unexpected_failure_is_a_counted_json_500_and_the_server_goes_on(
    tmp_path, image_files, caplog
):
    app = create_app(failing_over_one_image(tmp_path / "broken.onnx"))
    data = image_files[0].read_bytes()
    with serving.running(app) as base:
        files = [("images", (f"{i}.png", data)) for i in range(2)]
        response = httpx.post(f"{base}/predict", files=files)
        assert response.status_code == 500
        assert response.json() == {"error": "internal error; see the server's log"}
        text = httpx.get(f"{base}/metrics").text
        assert 'cnnforge_errors_total{reason="internal"} 1.0' in text
        assert 'cnnforge_requests_total{route="/predict",status="500"} 1.0' in text
        assert httpx.post(f"{base}/predict", content=data, headers=_raw).status_code == 200
    assert "/predict failed" in caplog.text


def test_serving_without_the_serve_extra_is_one_line(model, monkeypatch):
    from click.testing import CliRunner

    from cnnforge.cli import cli

    monkeypatch.setitem(sys.modules, "starlette", None)  # as if it were not installed
    result = CliRunner().invoke(cli, ["serve", str(model)])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "starlette" in line and "pip install 'cnnforge[serve]'" in line


def test_serve_passes_the_body_timeout_on_and_refuses_nonsense(model, monkeypatch):
    from click.testing import CliRunner

    import cnnforge.deploy.server as server_module
    from cnnforge.cli import cli

    given = {}
    monkeypatch.setattr(server_module, "serve", lambda model, **options: given.update(options))
    result = CliRunner().invoke(cli, ["serve", str(model), "--body-timeout", "2.5"])
    assert result.exit_code == 0 and given["body_timeout"] == 2.5
    result = CliRunner().invoke(cli, ["serve", str(model), "--body-timeout", "0"])
    assert result.exit_code == 2 and "--body-timeout" in result.stderr
