"""`cnnforge serve --grpc-port`: the Open Inference Protocol's gRPC service, checked with Triton's
own client (`tritonclient.grpc`, unchanged) against a real server on loopback (ephemeral ports
for HTTP and gRPC): health, metadata and the repository index; infer with the model's pixel
tensor (UINT8 and FP32) and with encoded images (BYTES), equal to `cnnforge predict`'s answers;
the classification extension; bad tensors and unknown models refused with one line; the token;
the metrics; concurrent calls; SIGTERM draining the gRPC calls in flight with the HTTP ones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import serving
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from click.testing import CliRunner
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import scale
from cnnforge.deploy.predict import Classifier
from cnnforge.deploy.server import TOKEN_ENV, create_app, server

NAME = "model"  # the ONNX file's stem
PIXELS, IMAGE, OUTPUT = "x", "image", "probabilities"  # the test model's tensors
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return serving.model(tmp_path_factory.mktemp("grpc") / f"{NAME}.onnx")


@pytest.fixture(scope="module")
def served(model):
    """(HTTP base URL, gRPC address) of one server with a token; port 0: an ephemeral one."""
    app = create_app(model, max_batch=8, token=TOKEN, grpc_address=("127.0.0.1", 0))
    with serving.running(app) as url:
        yield url, f"127.0.0.1:{app.state.grpc.port}"


@pytest.fixture
def client(served):
    with triton.InferenceServerClient(served[1]) as connection:
        yield connection


AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def images():
    """Six 28×28 grey images as uint8 pixels (N, 28, 28, 1)."""
    return np.random.default_rng(3).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)


def expected(model, pixels: np.ndarray) -> np.ndarray:
    """What `cnnforge predict`'s Classifier answers for these images."""
    return Classifier(model).probabilities([Image.fromarray(p[..., 0]) for p in pixels])


def infer(client, inputs, outputs=None, name=NAME):
    return client.infer(name, inputs, outputs=outputs, headers=AUTH)


def tensor(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    given = triton.InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array)
    return given


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_health_metadata_and_repository_index(client, model):
    assert client.is_server_live() and client.is_server_ready()  # no token: health, as /health
    assert client.is_model_ready(NAME, headers=AUTH)
    server = client.get_server_metadata(headers=AUTH, as_json=True)
    assert server["name"] == "cnnforge"
    assert {"classification", "model_repository"} <= set(server["extensions"])
    metadata = client.get_model_metadata(NAME, headers=AUTH, as_json=True)
    assert metadata["name"] == NAME and metadata["platform"] == "onnxruntime_onnx"
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs[PIXELS]["shape"] == ["-1", "28", "28", "1"]  # int64 as JSON strings
    assert inputs[IMAGE]["datatype"] == "BYTES"
    (output,) = metadata["outputs"]
    assert output["name"] == OUTPUT and output["datatype"] == "FP32"
    assert output["shape"] == ["-1", "10"]
    index = client.get_model_repository_index(headers=AUTH, as_json=True)
    assert [(m["name"], m["state"]) for m in index["models"]] == [(NAME, "READY")]


def test_pixel_tensors_uint8_and_fp32_answer_as_cnnforge_predict(client, model, images):
    want = expected(model, images)
    result = infer(client, [tensor(PIXELS, images, "UINT8")], [triton.InferRequestedOutput(OUTPUT)])
    np.testing.assert_allclose(result.as_numpy(OUTPUT), want, rtol=1e-5, atol=1e-7)
    # FP32: pixels already in the model's range, as its graph takes them
    scaled = scale(images, Classifier(model).pixel_range)
    result = infer(client, [tensor(PIXELS, scaled, "FP32")])  # no outputs named: all of them
    np.testing.assert_allclose(result.as_numpy(OUTPUT), want, rtol=1e-5, atol=1e-7)


def test_encoded_images_answer_as_cnnforge_predict(client, model, images):
    files = np.array([serving.png(p[..., 0]) for p in images[:3]], dtype=np.object_)
    result = infer(client, [tensor(IMAGE, files, "BYTES")])
    np.testing.assert_allclose(result.as_numpy(OUTPUT), expected(model, images[:3]), rtol=1e-5)


def test_typed_contents_answer_as_raw_bytes_do(served, model, images):
    """A request with `contents` (no raw_input_contents), as clients other than Triton's send."""
    request = service_pb2.ModelInferRequest(model_name=NAME)
    given = request.inputs.add(name=PIXELS, datatype="UINT8", shape=images[:2].shape)
    given.contents.uint_contents.extend(images[:2].ravel().tolist())
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    (output,) = answer.outputs
    assert (output.name, output.datatype, list(output.shape)) == (OUTPUT, "FP32", [2, 10])
    got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, expected(model, images[:2]), rtol=1e-5, atol=1e-7)
    files = service_pb2.ModelInferRequest(model_name=NAME)
    given = files.inputs.add(name=IMAGE, datatype="BYTES", shape=[2])
    given.contents.bytes_contents.extend([serving.png(p[..., 0]) for p in images[:2]])
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(files, metadata=tuple(AUTH.items()))
    typed_files = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_allclose(typed_files, got, rtol=1e-5, atol=1e-7)


def test_classification_extension_gives_tritons_strings(client, model, images):
    want = expected(model, images[:2])
    asked = [triton.InferRequestedOutput(OUTPUT, class_count=3)]
    got = infer(client, [tensor(PIXELS, images[:2], "UINT8")], asked).as_numpy(OUTPUT)
    assert got.shape == (2, 3)
    for row, strings in zip(want, got, strict=True):
        best = np.argsort(-row, kind="stable")[:3]
        parsed = [s.decode().split(":") for s in strings]
        assert [int(index) for _, index, _ in parsed] == best.tolist()
        assert [label for _, _, label in parsed] == [serving.CLASSES[i] for i in best]
        np.testing.assert_allclose([float(p) for p, _, _ in parsed], row[best], rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "array", "datatype", "words"),
    [
        (PIXELS, np.zeros((2, 28, 27, 1), np.uint8), "UINT8", ["shape"]),
        (PIXELS, np.zeros((2, 28, 28, 1), np.int32), "INT32", ["datatype", "INT32"]),
        (PIXELS, np.zeros((9, 28, 28, 1), np.uint8), "UINT8", ["9 images", "1 to 8"]),
        (IMAGE, np.array([b"not an image"], dtype=np.object_), "BYTES", ["image[0]"]),
        ("pixels", np.zeros((1, 28, 28, 1), np.uint8), "UINT8", ["unknown input", "pixels"]),
    ],
)
def test_bad_tensors_are_invalid_argument_with_one_line(client, name, array, datatype, words):
    error = refusal(lambda: infer(client, [tensor(name, array, datatype)]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "\n" not in error.message() and all(w in error.message() for w in words)


def hand_made(served, request) -> grpc.RpcError:
    """The error of a ModelInferRequest built by hand (what Triton's client would not send)."""
    with grpc.insecure_channel(served[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    return caught.value


def test_a_byte_count_that_does_not_fit_the_shape_is_invalid_argument(served, images):
    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name=PIXELS, datatype="UINT8", shape=[2, 28, 28, 1])
    request.raw_input_contents.append(images[:2].tobytes()[:-5])
    error = hand_made(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "byte" in error.details() and "\n" not in error.details()


@pytest.mark.parametrize(
    ("shape", "count", "words"),
    [
        ([-1], 1, ["shape", "whole numbers"]),  # a negative size
        ([2**32, 2**32], 0, ["shape", "elements"]),  # its product past int64
        ([3], 2, ["2 BYTES elements", "[3]"]),
    ],
)
def test_typed_bytes_contents_that_do_not_fit_their_shape_are_invalid_argument(
    served, images, shape, count, words
):
    request = service_pb2.ModelInferRequest(model_name=NAME)
    given = request.inputs.add(name=IMAGE, datatype="BYTES", shape=shape)
    given.contents.bytes_contents.extend([serving.png(images[0, ..., 0])] * count)
    error = hand_made(served, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert all(w in error.details() for w in words), error.details()


def test_an_unknown_model_is_not_found_and_other_calls_unimplemented(client, images):
    given = [tensor(PIXELS, images[:1], "UINT8")]
    error = refusal(lambda: infer(client, given, name="other"))
    assert error.status() == "StatusCode.NOT_FOUND" and "other" in error.message()
    error = refusal(lambda: client.get_model_metadata("other", headers=AUTH))
    assert error.status() == "StatusCode.NOT_FOUND"
    error = refusal(lambda: client.get_inference_statistics(NAME, headers=AUTH))
    assert error.status() == "StatusCode.UNIMPLEMENTED"


def test_name_gives_the_model_its_name_over_grpc_as_over_rest(model, images):
    app = create_app(model, name="fashion", grpc_address=("127.0.0.1", 0))
    with serving.running(app) as url:
        with triton.InferenceServerClient(f"127.0.0.1:{app.state.grpc.port}") as client:
            assert client.get_model_metadata("fashion", as_json=True)["name"] == "fashion"
            index = client.get_model_repository_index(as_json=True)
            assert [m["name"] for m in index["models"]] == ["fashion"]
            got = client.infer("fashion", [tensor(PIXELS, images[:1], "UINT8")])
            assert got.get_response().model_name == "fashion"
            error = refusal(lambda: client.is_model_ready(NAME))  # the stem is not its name now
            assert error.status() == "StatusCode.NOT_FOUND"
        assert httpx.get(f"{url}/v2/models/fashion").status_code == 200


def test_the_token_is_needed_for_all_but_health_and_metrics_count_grpc_calls(served, images):
    with triton.InferenceServerClient(served[1]) as client:
        error = refusal(lambda: client.get_model_metadata(NAME))
        assert error.status() == "StatusCode.UNAUTHENTICATED" and "Bearer" in error.message()
        wrong = {"authorization": "Bearer nope"}
        error = refusal(
            lambda: client.infer(NAME, [tensor(PIXELS, images[:1], "UINT8")], headers=wrong)
        )
        assert error.status() == "StatusCode.UNAUTHENTICATED"
        infer(client, [tensor(PIXELS, images[:1], "UINT8")])
    text = httpx.get(f"{served[0]}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    count = re.search(
        r'^cnnforge_requests_total\{route="grpc:ModelInfer",status="OK"\} (\S+)', text, re.M
    )
    assert count and float(count.group(1)) >= 1
    assert re.search(
        r'^cnnforge_requests_total\{route="grpc:ModelInfer",status="UNAUTHENTICATED"\}', text, re.M
    )
    assert 'cnnforge_errors_total{reason="unauthorized"}' in text


def test_sixteen_concurrent_calls_are_all_answered_with_their_own_rows(served, model):
    pixels = np.random.default_rng(5).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    want = expected(model, pixels)

    async def call_all() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(served[1])
        try:

            async def one(i: int) -> np.ndarray:
                given = triton_aio.InferInput(PIXELS, [1, 28, 28, 1], "UINT8")
                given.set_data_from_numpy(pixels[i : i + 1])
                result = await client.infer(NAME, [given], headers=AUTH)
                return result.as_numpy(OUTPUT)[0]

            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    got = asyncio.run(call_all())
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-7)


def test_the_grpc_port_is_off_unless_given_and_in_the_help(model, monkeypatch):
    import cnnforge.deploy.server as server_module

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert "--grpc-port" in result.output
    given: dict = {}
    monkeypatch.setattr(server_module, "serve", lambda model, **options: given.update(options))
    assert CliRunner().invoke(cli, ["serve", str(model)]).exit_code == 0
    assert given["grpc_port"] is None
    assert CliRunner().invoke(cli, ["serve", str(model), "--grpc-port", "8001"]).exit_code == 0
    assert given["grpc_port"] == 8001


def test_a_busy_grpc_port_or_a_missing_extra_is_one_line(model, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(cli, ["serve", str(model), "--port", "0", "--grpc-port", port])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--grpc-port" in line
    result = CliRunner().invoke(cli, ["serve", str(model), "--port", port, "--grpc-port", port])
    assert result.exit_code == 1 and "a port of its own" in result.stderr
    import cnnforge.deploy.server as server_module

    def no_listening(*args):  # refused before anything listens, or this fails, not hangs
        raise AssertionError("the server started")

    monkeypatch.setattr(server_module, "listen", no_listening)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.service_pb2", None)  # not installed
    result = CliRunner().invoke(cli, ["serve", str(model), "--grpc-port", "0"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "tritonclient.grpc.service_pb2" in line and "pip install 'cnnforge[grpc]'" in line
    with pytest.raises(CnnforgeError, match=r"pip install 'cnnforge\[grpc\]'"):
        create_app(model, grpc_address=("127.0.0.1", 0))


@contextlib.contextmanager
def held(app) -> Iterator[tuple[Any, threading.Event, threading.Event]]:
    """``app`` on a uvicorn server in a thread whose onnxruntime calls wait for ``release``
    (``running`` is set when one does); yields (the uvicorn server, release, running)."""
    release, running = threading.Event(), threading.Event()
    run = app.state.service.batcher.run

    def waiting(batch: np.ndarray) -> np.ndarray:
        running.set()
        release.wait(30)
        return run(batch)

    app.state.service.batcher.run = waiting
    instance = server(app, port=serving.free_port(), log_level="warning")
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.02)
    try:
        yield instance, release, running
    finally:
        release.set()
        instance.should_exit = True
        thread.join(30)
    assert not thread.is_alive()


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stopping_refuses_new_calls_and_answers_those_in_flight(model, images):
    """What SIGTERM does (uvicorn's should_exit): the gRPC port stops taking calls with the HTTP
    one, the calls already in the batcher are answered, then the server returns."""
    app = create_app(model, grpc_address=("127.0.0.1", 0), max_wait_ms=0)
    with held(app) as (instance, release, running):
        address = f"127.0.0.1:{app.state.grpc.port}"
        with ThreadPoolExecutor(3) as pool, triton.InferenceServerClient(address) as client:
            calls = [pool.submit(infer, client, [tensor(PIXELS, images[:1], "UINT8")])]
            wait_for(running.is_set)  # one call in onnxruntime
            calls += [
                pool.submit(infer, client, [tensor(PIXELS, images[i : i + 1], "UINT8")])
                for i in (1, 2)
            ]
            wait_for(lambda: app.state.service.batcher.depth == 2)  # two queued behind it
            instance.should_exit = True
            time.sleep(0.5)  # uvicorn's loop sees it within 0.1 s
            with triton.InferenceServerClient(address) as late:
                error = refusal(lambda: late.is_server_live(client_timeout=5))
            assert error.status() == "StatusCode.UNAVAILABLE"
            assert not any(call.done() for call in calls)  # still waiting, not refused
            release.set()
            got = [call.result(30).as_numpy(OUTPUT)[0] for call in calls]
    np.testing.assert_allclose(np.stack(got), expected(model, images[:3]), rtol=1e-5, atol=1e-7)


def test_the_queue_is_shared_with_http_and_calls_are_bounded(model, images):
    """A queue filled by HTTP requests is UNAVAILABLE over gRPC, as it is a 503 over HTTP; more
    than --max-queue calls at once are gRPC's own RESOURCE_EXHAUSTED."""
    app = create_app(model, grpc_address=("127.0.0.1", 0), max_wait_ms=0, max_queue=1)
    with held(app) as (instance, release, running):
        url = f"http://127.0.0.1:{instance.config.port}/predict"
        body = serving.png(images[0, ..., 0])

        def post() -> int:
            headers = {"Content-Type": "image/png"}
            return httpx.post(url, content=body, headers=headers, timeout=30).status_code

        address = f"127.0.0.1:{app.state.grpc.port}"
        with ThreadPoolExecutor(4) as pool, triton.InferenceServerClient(address) as client:
            posts = [pool.submit(post)]  # in onnxruntime
            wait_for(running.is_set)
            posts.append(pool.submit(post))  # queued: the queue is full
            wait_for(lambda: app.state.service.full)
            one = [tensor(PIXELS, images[:1], "UINT8")]
            error = refusal(lambda: infer(client, one))
            assert error.status() == "StatusCode.UNAVAILABLE" and "queue is full" in error.message()
            release.set()
            assert [p.result(30) for p in posts] == [200, 200]
            release.clear()
            running.clear()
            call = pool.submit(infer, client, one)  # --max-queue calls in progress
            wait_for(running.is_set)
            error = refusal(lambda: infer(client, one))
            assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
            release.set()
            assert call.result(30).as_numpy(OUTPUT).shape == (1, 10)


def test_cnnforge_serve_grpc_port_token_from_env_and_sigterm_exits_0(tmp_path, images):
    model = serving.model(tmp_path / f"{NAME}.onnx")
    port, grpc_port = serving.free_port(), serving.free_port()
    command = [sys.executable, "-m", "cnnforge.cli", "serve", str(model), "--port", str(port)]
    command += ["--grpc-port", str(grpc_port)]
    env = {**os.environ, TOKEN_ENV: TOKEN}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        serving.wait_until_up(f"http://127.0.0.1:{port}", process)
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            error = refusal(lambda: client.is_model_ready(NAME))
            assert error.status() == "StatusCode.UNAUTHENTICATED"
            got = infer(client, [tensor(PIXELS, images, "UINT8")]).as_numpy(OUTPUT)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
    np.testing.assert_allclose(got, expected(model, images), rtol=1e-5, atol=1e-7)
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert f"gRPC on 127.0.0.1:{grpc_port}" in output
