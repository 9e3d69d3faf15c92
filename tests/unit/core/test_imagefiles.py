"""The one opener of a user's image files: the documented raster formats open, any other
format Pillow knows (EPS, which runs Ghostscript) is refused by name before its plugin runs."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.imagefiles import (
    IMAGE_FORMATS,
    UnsupportedImageFormat,
    open_image_file,
)


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_documented_format_opens_from_a_path_or_bytes(tmp_path, fmt):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(buffer.getvalue())
    for source in (path, io.BytesIO(buffer.getvalue())):
        with open_image_file(source) as image:
            assert image.format == fmt and image.size == (10, 12)


def test_the_documented_formats_are_the_raster_ones():
    assert IMAGE_FORMATS == ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def test_eps_is_refused_by_name_before_pillows_eps_plugin_runs(tmp_path, postscript):
    path = tmp_path / "drawing.png"  # a PostScript body behind an image suffix
    path.write_bytes(postscript)
    for source, label in ((path, "drawing.png"), (io.BytesIO(postscript), "image bytes")):
        with pytest.raises(UnsupportedImageFormat, match=f"{label}.* EPS,") as caught:
            open_image_file(source)
        assert isinstance(caught.value, CnnforgeError) and caught.value.format == "EPS"
        assert "PNG, JPEG, BMP, GIF, TIFF or WebP" in str(caught.value)
    # it crosses process boundaries whole (folders are decoded in worker processes)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (str(copy), copy.format) == (str(caught.value), "EPS")


def test_bytes_of_no_known_format_are_still_pillows_unidentified_error():
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        open_image_file(io.BytesIO(b"hello, world" * 10))
