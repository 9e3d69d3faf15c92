"""Image files as a model's input: the one loader that ``predict`` and ``explain`` share.

Open and decode the file, turn it upright as its EXIF orientation says (phone photos are
stored sideways with a tag), then apply the model's ``Preprocessing`` (the one its training
data was read with: colour mode, size, resize policy, interpolation), saying what was changed.
Pillow and numpy only, no TensorFlow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.core.imagefiles import FORMATS_TEXT, open_image_file
from cnnforge.core.preprocessing import Preprocessing

EXIF_ORIENTATION = 0x0112


@dataclass
class LoadedImage:
    """An image as the model takes it, and what was done to get it there."""

    pixels: np.ndarray  # (H, W, C) float32, raw 0-255, the model's input size
    notes: list[str] = field(default_factory=list)


def open_image(path: Path | str | bytes, max_pixels: int | None = None) -> tuple[Any, list[str]]:
    """The decoded Pillow image of ``path`` (or of encoded image bytes) turned upright (EXIF
    orientation applied), and a note where it was turned; a missing or undecodable file, one
    in a format cnnforge does not open (:class:`~cnnforge.core.imagefiles.UnsupportedImageFormat`,
    before Pillow's plugin for it runs), or one over the pixel limit (a decompression bomb), is
    one clear line. The limit is Pillow's
    (``Image.MAX_IMAGE_PIXELS``) or ``max_pixels`` where lower, checked from the header,
    before anything is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(path, bytes):
        label, name, source = "image bytes", "the image", io.BytesIO(path)
    else:
        path = Path(path)
        if path.is_dir():
            raise CnnforgeError(f"image {path} is a folder; give image files")
        if not path.is_file():
            raise CnnforgeError(f"image {path} does not exist; check the path")
        label, name, source = f"image {path}", path.name, path
    try:
        with open_image_file(source) as image:
            limit = min(x for x in (Image.MAX_IMAGE_PIXELS, max_pixels, float("inf")) if x)
            if image.size[0] * image.size[1] > limit:
                raise _too_large(label, f" ({image.size[0]}×{image.size[1]})", limit)
            image.load()
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            upright = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:  # over twice the limit: Pillow refuses in open()
        raise _too_large(label) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, UnidentifiedImageError) and isinstance(path, bytes):
            reason = "not an image format Pillow knows"  # its message names a BytesIO object
        raise CnnforgeError(
            f"cannot decode {label} ({reason}); give a {FORMATS_TEXT} file"
        ) from None
    notes = []
    if orientation in range(2, 9):
        notes.append(f"turned {name} upright, as its EXIF orientation ({orientation}) says")
    return upright, notes


def _too_large(label: str, size: str = "", limit: float | None = None) -> CnnforgeError:
    from PIL import Image

    whose = "Pillow's limit" if limit in (None, Image.MAX_IMAGE_PIXELS) else "the limit"
    return CnnforgeError(
        f"{label} is too large{size}: over {whose} of {int(limit or Image.MAX_IMAGE_PIXELS):,} "
        "pixels (a possible decompression bomb); give a smaller image"
    )


def fit_image(
    image: Any, preprocessing: Preprocessing | tuple[int, int, int], name: str = "the image"
) -> LoadedImage:
    """A Pillow image as the model's raw (H, W, C) pixels by ``preprocessing`` (the model's
    recorded one; an (H, W, C) input shape means stretched, bilinear), a note for each change
    (``name`` names the image in them)."""
    if not isinstance(preprocessing, Preprocessing):
        preprocessing = Preprocessing.for_shape(tuple(preprocessing))
    height, width = preprocessing.size
    mode = preprocessing.color_mode
    notes = []
    if image.mode != mode:
        notes.append(f"converted {name} from {image.mode} to {mode}")
    if image.size != (width, height):
        how = {
            "stretch": "resized",
            "crop": "centre-cropped and resized",
            "pad": "padded and resized",
        }
        notes.append(
            f"{how[preprocessing.policy]} {name} from {image.size[0]}×{image.size[1]} to "
            f"{width}×{height}, the model's input size"
        )
    pixels = preprocessing.apply(image).astype(np.float32)
    return LoadedImage(pixels, notes)


def load_image(
    path: Path | str, preprocessing: Preprocessing | tuple[int, int, int]
) -> LoadedImage:
    """An image file as the model's (H, W, C) input, raw 0-255 pixels: decoded, turned upright,
    converted to its channels and resized to its size by ``preprocessing`` (or stretched to an
    (H, W, C) input shape), each change in ``notes``."""
    image, notes = open_image(path)
    fitted = fit_image(image, preprocessing, Path(path).name)
    return LoadedImage(fitted.pixels, notes + fitted.notes)
