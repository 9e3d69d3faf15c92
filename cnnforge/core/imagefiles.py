"""The image formats cnnforge opens, and the one function that opens a user's image file.

By default ``PIL.Image.open`` tries every format Pillow knows, EPS among them, and an EPS file
is rendered by running Ghostscript (``gs``) with no timeout: a looping PostScript body spins a
core for as long as it likes. cnnforge documents the raster formats PNG, JPEG, BMP, GIF, TIFF
and WebP, so every image it reads (the server, ``predict``, ``explain``, image folders) is
opened here with ``formats=`` set to those, and any other format is refused by name.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from cnnforge.core.errors import CnnforgeError

# Pillow's format identifiers, in the order Pillow tries them
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FORMATS_TEXT = "PNG, JPEG, BMP, GIF, TIFF or WebP"
_PREFIX = 16  # bytes Pillow's format checks look at


class UnsupportedImageFormat(CnnforgeError):
    """An image in a format Pillow knows but cnnforge does not open (``format``: Pillow's
    name for it)."""

    def __init__(self, message: str, format: str) -> None:
        super().__init__(message)
        self.format = format

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Exception pickles only its message: rebuilt with its format too (worker processes)
        return type(self), (str(self), self.format)


def open_image_file(source: Path | str | io.BufferedIOBase | io.BytesIO) -> Any:
    """``PIL.Image.open(source)`` for the formats of :data:`IMAGE_FORMATS` only (lazy: the
    header is read, the pixels are not). A file in another format Pillow recognises is
    :class:`UnsupportedImageFormat`, naming it, before that format's plugin runs; bytes of no
    format Pillow knows stay its ``UnidentifiedImageError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        other = _recognised_format(source)
        if other is None:
            raise
        raise UnsupportedImageFormat(
            f"{_label(source)} {'are' if _is_bytes(source) else 'is'} {other}, a format "
            f"cnnforge does not open; give a {FORMATS_TEXT} file",
            other,
        ) from None


def _recognised_format(source: Any) -> str | None:
    """The first format whose Pillow check (its magic bytes, nothing decoded) accepts the
    start of ``source``, or None."""
    from PIL import Image

    prefix = _prefix(source)
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if accept is None or name in IMAGE_FORMATS:
            continue
        try:
            found = accept(prefix)
        except Exception:  # noqa: BLE001 - a check that cannot read a short prefix
            continue
        if found and not isinstance(found, str):  # a str is a warning, not a match
            return name
    return None


def _prefix(source: Any) -> bytes:
    if isinstance(source, (str, Path)):
        with open(source, "rb") as file:
            return file.read(_PREFIX)
    source.seek(0)
    return source.read(_PREFIX)


def _is_bytes(source: Any) -> bool:
    return not isinstance(source, (str, Path))


def _label(source: Any) -> str:
    return "image bytes" if _is_bytes(source) else f"image {source}"
