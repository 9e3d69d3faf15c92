"""The one image-file loader of predict and explain: decoded, turned upright as the EXIF
orientation says, converted and resized to the model's input, each change said."""

from __future__ import annotations

import numpy as np
import pytest
import serving
from click.testing import CliRunner
from PIL import Image

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy.images import load_image, open_image

EXIF_ORIENTATION = 0x0112


def sideways(upright: np.ndarray, path, orientation: int = 6):
    """Save ``upright`` as a camera does: the pixels turned, the EXIF tag saying how to undo it
    (orientation 6: turn 90° clockwise to view)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def test_a_photo_with_an_exif_orientation_is_turned_upright_and_said_so(tmp_path):
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)  # 28 wide, 20 high
    path = sideways(upright, tmp_path / "photo.png")
    with Image.open(path) as stored:
        assert stored.size == (20, 28)  # stored sideways: 20 wide, 28 high

    loaded = load_image(path, (20, 28, 3))
    np.testing.assert_array_equal(loaded.pixels, upright.astype(np.float32))
    assert loaded.notes == ["turned photo.png upright, as its EXIF orientation (6) says"]

    gray = load_image(path, (10, 14, 1))
    expected = Image.fromarray(upright).convert("L").resize((14, 10), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(gray.pixels[..., 0], np.asarray(expected, np.float32))
    assert gray.notes[1:] == [
        "converted photo.png from RGB to L",
        "resized photo.png from 28×20 to 14×10, the model's input size",
    ]


def test_an_image_without_orientation_is_read_as_stored(tmp_path):
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    loaded = load_image(tmp_path / "plain.png", (28, 28, 1))
    np.testing.assert_array_equal(loaded.pixels[..., 0], pixels)
    assert loaded.notes == []


def test_folders_missing_and_undecodable_files_are_one_line(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    for path, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "missing.png", "missing.png does not exist"),
        (tmp_path / "bad.png", r"cannot decode image .*bad.png .*give a PNG"),
    ):
        with pytest.raises(CnnforgeError, match=message):
            load_image(path, (28, 28, 1))


def test_an_eps_file_or_body_is_refused_by_name_without_running_ghostscript(tmp_path, postscript):
    path = tmp_path / "drawing.eps"
    path.write_bytes(postscript)
    with pytest.raises(CnnforgeError, match=r"drawing.eps is EPS, .*give a PNG, JPEG"):
        load_image(path, (28, 28, 1))
    with pytest.raises(CnnforgeError, match=r"image bytes are EPS, "):
        open_image(postscript)


def test_predict_command_refuses_an_eps_file_in_one_line(tmp_path, postscript):
    model = serving.model(tmp_path / "model.onnx")
    (tmp_path / "drawing.eps").write_bytes(postscript)
    result = CliRunner().invoke(cli, ["predict", str(model), str(tmp_path / "drawing.eps")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "drawing.eps is EPS, a format cnnforge does not open" in lines[0]
