"""The one preprocessing definition: how an image file becomes a model's input.

The folder reader applies it at training time; ``cnnforge predict``, ``Classifier``,
``evaluate`` and ``explain`` apply it at deployment; the export records it in the ONNX
metadata (``cnnforge.preprocessing``), so every place turns a file into the same tensor.
Pillow and numpy only (Pillow imported when an image is touched): deployment imports this.

The steps, in order: EXIF orientation (done by whoever opens the file), mode normalisation
(:func:`to_mode`: 16-bit integers scaled to 8 bits, palette/CMYK/YCbCr/… to RGB, transparency
flattened onto black), conversion to the colour mode, then the resize policy:

- ``stretch`` (the default, as Keras' ``image_dataset_from_directory``): resize to H×W,
  ignoring the aspect ratio; nothing of the image is lost;
- ``crop``: centre-crop to the aspect ratio of H×W, then resize;
- ``pad``: resize to fit inside H×W keeping the aspect ratio, pad with black (letterbox).

It makes raw 0–255 pixels. The range a model's input takes is the model's, not the image
file's: the export records it once, as ``cnnforge.pixel_range``, and :func:`scale` maps raw
pixels to it (a model exported before this keeps a copy inside ``cnnforge.preprocessing``,
which is read and ignored).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError

RESIZE_POLICIES = ("stretch", "crop", "pad")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "area")
COLOR_MODES = ("L", "RGB", "RGBA")  # RGBA: only for models trained on 4-channel arrays
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# The largest side a size chosen from the data gets: training on a CPU stays affordable.
DEFAULT_MAX_SIDE = 128

IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of an image file → Pillow mode


@dataclass(frozen=True)
class Preprocessing:
    """Size (H, W), resize policy, interpolation and colour mode (``L``, ``RGB``, or ``RGBA``
    for models trained on 4-channel arrays). ``size`` or ``color_mode`` ``None``: not decided
    yet (the reader decides them from the data, :meth:`resolved`)."""

    size: tuple[int, int] | None = None
    policy: str = "stretch"
    interpolation: str = "bilinear"
    color_mode: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in RESIZE_POLICIES:
            raise CnnforgeError(
                f"resize policy {self.policy!r} is unknown; choose {', '.join(RESIZE_POLICIES)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise CnnforgeError(
                f"interpolation {self.interpolation!r} is unknown; choose "
                f"{', '.join(INTERPOLATIONS)}"
            )
        if self.color_mode is not None and self.color_mode not in COLOR_MODES:
            raise CnnforgeError(
                f"colour mode {self.color_mode!r} is unknown; choose {', '.join(COLOR_MODES)}"
            )
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise CnnforgeError(f"image size must be two positive numbers, got {self.size}")
            object.__setattr__(self, "size", size)

    @property
    def channels(self) -> int:
        return {"L": 1, "RGBA": 4}.get(self.color_mode or "RGB", 3)

    @property
    def complete(self) -> bool:
        return self.size is not None and self.color_mode is not None

    def resolved(self, sizes: list[tuple[int, int]], modes: list[str]) -> Preprocessing:
        """This preprocessing with what it leaves open decided from the data's (W, H) sizes
        and Pillow modes: :func:`default_size` and :func:`color_mode_of`."""
        return replace(
            self,
            size=self.size or default_size(sizes),
            color_mode=self.color_mode or color_mode_of(modes),
        )

    def to_json(self) -> dict[str, Any]:
        saved = asdict(self)
        saved["size"] = list(self.size) if self.size else None
        return saved

    @classmethod
    def from_json(cls, saved: dict[str, Any] | str) -> Preprocessing:
        """``saved`` as :meth:`to_json` wrote it (a dict or its JSON text). Keys it does not
        know are ignored: models exported before carry a ``pixel_range`` copy here."""
        saved = json.loads(saved) if isinstance(saved, str) else saved
        known = {"size", "policy", "interpolation", "color_mode"}
        values = {k: v for k, v in saved.items() if k in known}
        if values.get("size") is not None:
            values["size"] = tuple(values["size"])
        return cls(**values)

    @classmethod
    def of_model(
        cls,
        metadata: Mapping[str, Any],
        input_shape: Sequence[int],
        *,
        model: str = "the model",
        remedy: str = "export it again",
    ) -> Preprocessing:
        """The preprocessing of a model taking (H, W, C) ``input_shape`` images: the one its
        ``metadata`` records (``preprocessing``: JSON text, a dict, or a Preprocessing; the
        ``cnnforge.*`` metadata of an ONNX model, or what a Keras model's run recorded),
        else, for a model without it, stretched (bilinear) to the input shape.

        Every place that turns files into a model's input asks this: ``predict``,
        ``Classifier``, ``evaluate``, the report's figures, the export. A recorded size or
        colour mode the input does not take is an error naming ``model`` and ``remedy``."""
        shape = tuple(int(v) for v in input_shape)
        saved = metadata.get("preprocessing")
        if not saved:
            return cls.for_shape(shape)
        recorded = saved if isinstance(saved, Preprocessing) else cls.from_json(saved)
        if not recorded.complete or (*recorded.size, recorded.channels) != shape:
            raise CnnforgeError(
                f"{model} records preprocessing to {recorded.describe()} but takes {shape} "
                f"images (H, W, C); {remedy}"
            )
        return recorded

    @classmethod
    def for_shape(cls, input_shape: Sequence[int], **options: Any) -> Preprocessing:
        """The preprocessing of a model taking (H, W, C) raw images: stretch, bilinear."""
        height, width, channels = input_shape
        mode = IMAGE_MODES.get(channels)
        if mode is None:
            raise CnnforgeError(
                f"the model takes {channels}-channel images; cnnforge reads 1 (grayscale), "
                "3 (RGB) or 4 (RGBA)"
            )
        return cls(size=(height, width), color_mode=mode, **options)

    def describe(self) -> str:
        size = f"{self.size[0]}x{self.size[1]}" if self.size else "from the data"
        return (
            f"{size} {self.color_mode or 'mode from the data'}, {self.policy}, {self.interpolation}"
        )

    def apply(self, image: Any) -> np.ndarray:
        """A Pillow image (already upright) as (H, W, C) uint8 pixels, 0–255."""
        if not self.complete:
            raise CnnforgeError("preprocessing without a size and colour mode cannot be applied")
        image = to_mode(image, self.color_mode)
        image = resize(image, self.size, self.policy, self.interpolation)
        return np.asarray(image, dtype=np.uint8).reshape(*self.size, self.channels)


def pixel_range_of(metadata: Mapping[str, Any]) -> tuple[float, float]:
    """The pixel range a model's input takes: its ``pixel_range`` metadata, else raw 0–255."""
    low, high = metadata.get("pixel_range") or (0, 255)
    return low, high


def scale(pixels: np.ndarray, pixel_range: Sequence[float] = (0, 255)) -> np.ndarray:
    """Raw 0–255 pixels as float32 in ``pixel_range`` (the model's :func:`pixel_range_of`)."""
    low, high = (float(v) for v in pixel_range)
    pixels = np.asarray(pixels, dtype=np.float32)
    if (low, high) == (0.0, 255.0):
        return pixels
    return (low + pixels * ((high - low) / 255.0)).astype(np.float32)


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``"64"`` → (64, 64); ``"48x64"`` → (48, 64) (height × width); ``None`` stays None."""
    if text is None or text == "":
        return None
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise CnnforgeError(
            f"image size {text!r} is not N or HxW (e.g. 64 or 48x64); give positive numbers"
        )
    return values  # type: ignore[return-value]


def default_size(sizes: list[tuple[int, int]], max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """(H, W) for images of these (W, H) sizes: the median width and height, scaled down
    (aspect kept) so the longer side is at most ``max_side``."""
    if not sizes:
        raise CnnforgeError("no images to choose an image size from")
    widths, heights = np.array(sizes).T
    height, width = float(np.median(heights)), float(np.median(widths))
    factor = min(1.0, max_side / max(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def color_mode_of(modes: list[str]) -> str:
    """``L`` when every image is grayscale (Pillow modes 1, L, LA, I, I;16, F), else RGB.
    Palette images count as colour."""
    return "L" if modes and all(m in GRAYSCALE_MODES for m in modes) else "RGB"


def to_mode(image: Any, mode: str) -> Any:
    """A Pillow image in ``mode`` (L, RGB or RGBA), converted predictably:

    - 16-bit integers (``I;16*``) scaled to 8 bits (÷257); 32-bit integers (``I``) likewise
      when a value exceeds 255, values above 65535 clipped to 255 first, and taken as 8-bit
      values (kept) when none exceeds 255; floats (``F``) clipped to 0–255. This holds for
      every target mode, RGBA included;
    - into L or RGB: transparency flattened onto black; palette, CMYK and other modes
      converted by Pillow to RGB first. Into RGBA: Pillow's conversion, alpha kept."""
    from PIL import Image

    if image.mode == mode:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image)
        if image.mode == "F":
            array = np.clip(array, 0, 255)
        elif array.max(initial=0) > 255 or image.mode.startswith("I;16"):
            array = np.clip(array, 0, 65535) / 257.0
        image = Image.fromarray(np.round(array).astype(np.uint8), "L")
    if mode == "RGBA" or image.mode == mode:
        return image.convert(mode)
    if image.mode == "P" and "transparency" in image.info or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert(mode) if image.mode != mode else image


def resize(image: Any, size: tuple[int, int], policy: str, interpolation: str) -> Any:
    """``image`` at (H, W) ``size`` by ``policy`` (stretch, crop, pad) and ``interpolation``."""
    from PIL import Image, ImageOps

    method = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "area": Image.Resampling.BOX,
    }[interpolation]
    height, width = size
    if image.size == (width, height):
        return image
    if policy == "crop":
        return ImageOps.fit(image, (width, height), method)
    if policy == "pad":
        return ImageOps.pad(image, (width, height), method, color=0)
    return image.resize((width, height), method)
