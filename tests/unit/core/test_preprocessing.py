"""The recorded preprocessing, read in one place: ``Preprocessing.of_model`` (ONNX metadata or a
run's data.json) and ``RunDir.read_preprocessing``; models exported before stay readable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.preprocessing import Preprocessing, pixel_range_of, scale, to_mode
from cnnforge.core.rundir import RunDir

RECORDED = Preprocessing(size=(12, 16), policy="pad", interpolation="area", color_mode="L")


@pytest.mark.parametrize(
    "saved", [RECORDED, RECORDED.to_json(), json.dumps(RECORDED.to_json())], ids=str
)
def test_of_model_returns_what_the_model_records(saved):
    assert Preprocessing.of_model({"preprocessing": saved}, (12, 16, 1)) == RECORDED


def test_of_model_stretches_to_the_input_of_a_model_without_a_record():
    for metadata in ({}, {"preprocessing": None}, {"pixel_range": [0, 1]}):
        assert Preprocessing.of_model(metadata, (20, 24, 3)) == Preprocessing(
            size=(20, 24), policy="stretch", interpolation="bilinear", color_mode="RGB"
        )


def test_a_record_the_input_does_not_take_is_one_line_naming_the_model():
    with pytest.raises(CnnforgeError, match=r"m\.onnx records preprocessing to 12x16 L.*; redo"):
        Preprocessing.of_model(
            {"preprocessing": RECORDED.to_json()}, (12, 16, 3), model="m.onnx", remedy="redo"
        )


def test_the_pixel_range_is_recorded_once_beside_the_preprocessing_not_in_it():
    assert "pixel_range" not in RECORDED.to_json()
    # a model exported before kept a copy inside cnnforge.preprocessing: read, and ignored
    legacy = {**RECORDED.to_json(), "pixel_range": [0.0, 255.0]}
    metadata = {"pixel_range": [0, 1], "preprocessing": json.dumps(legacy)}
    assert Preprocessing.of_model(metadata, (12, 16, 1)) == RECORDED
    assert pixel_range_of(metadata) == (0, 1) and pixel_range_of({}) == (0, 255)
    raw = np.array([0, 51, 255], dtype=np.uint8)
    np.testing.assert_allclose(scale(raw, pixel_range_of(metadata)), [0.0, 0.2, 1.0])
    np.testing.assert_allclose(scale(raw, (-1, 1)), [-1.0, -0.6, 1.0])
    assert scale(raw).dtype == np.float32 and scale(raw).tolist() == [0.0, 51.0, 255.0]


def test_run_dir_reads_the_preprocessing_its_data_was_read_with(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_preprocessing() is None  # a run made before data.json
    run.write_json(run.data, {"preprocessing": RECORDED.to_json(), "skipped": {}})
    assert run.read_preprocessing() == RECORDED


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_16_bit_images_are_scaled_not_clipped_into_every_colour_mode(mode):
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    pixels = np.asarray(to_mode(wide, mode)).reshape(1, 3, -1)
    assert pixels[0, :, 0].tolist() == [0, 100, 255]
    if mode == "RGBA":
        assert pixels[0, :, 3].tolist() == [255] * 3  # opaque


def test_32_bit_images_of_8_bit_values_are_kept_and_larger_ones_scaled_then_clipped():
    small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    large = Image.fromarray(np.array([[0, 257 * 100, 70000]], dtype=np.int32))
    assert small.mode == large.mode == "I"
    assert np.asarray(to_mode(small, "L")).tolist() == [[0, 100, 255]]
    assert np.asarray(to_mode(large, "L")).tolist() == [[0, 100, 255]]
