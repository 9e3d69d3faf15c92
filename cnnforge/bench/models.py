"""What a benchmark feeds each model: its inputs (images, or the shapes given with ``--shape``),
the batch sizes that fit it, its FLOPs per image and a label unique in the sweep."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError
from cnnforge.deploy import onnxinfo
from cnnforge.deploy.timing import random_array

DEFAULT_BATCH_SIZES = (1, 8, 32)

Shapes = dict[str | None, tuple[int, ...]]


@dataclass(frozen=True)
class Feed:
    """One model input: its name, dtype and per-item dims (batch axis left out)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    fixed_batch: int | None = None


@dataclass
class BenchModel:
    """A model file as the benchmark sees it: label, inputs, FLOPs, the batch sizes to time."""

    path: str
    label: str
    precision: str | None
    layout: str | None  # NHWC / NCHW for image models, None for a model fed by --shape
    feeds: tuple[Feed, ...]
    flops_per_image: int | None
    batch_sizes: tuple[int, ...]
    value_range: tuple[float, float]
    source: str | None = None  # the .keras file it was exported from (cnnforge.source metadata)

    def arrays(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            f.name: random_array(rng, f.dtype, (batch_size, *f.shape), self.value_range)
            for f in self.feeds
        }


def parse_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``"3x224x224"`` or ``"input_ids=128"`` → (input name or None, per-item dims)."""
    name, sep, dims = text.rpartition("=")
    try:
        parsed = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 1 or (sep and not name):
        raise CnnforgeError(
            f"--shape {text!r} is not [NAME=]DIMS; write per-item dims like 3x224x224 or "
            "input_ids=128 (the batch axis comes from --batch-sizes)"
        )
    return (name or None), parsed


def _metadata(proto: Any) -> dict[str, Any]:
    meta = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("cnnforge."):
            try:
                meta[prop.key[len("cnnforge.") :]] = json.loads(prop.value)
            except json.JSONDecodeError:
                meta[prop.key[len("cnnforge.") :]] = prop.value
    return meta


def _image_feeds(proto: Any, path: str) -> tuple[list[Feed], str]:
    try:
        image = onnxinfo.image_input(proto)
    except CnnforgeError as exc:
        hint = "" if "--shape" in str(exc) else "; to time it anyway give --shape [NAME=]DIMS"
        raise CnnforgeError(f"{path}: {exc}{hint}") from None
    fixed = image.batch if isinstance(image.batch, int) and image.batch > 0 else None
    return [Feed(image.name, image.dtype, image.shape, fixed)], image.layout


def _given_feeds(proto: Any, shapes: Shapes, path: str) -> list[Feed]:
    """Feeds from ``--shape``: every input named (or the only one), ranks and fixed dims checked."""
    inputs = onnxinfo.inputs(proto)
    names = ", ".join(i.name for i in inputs)
    if None in shapes:
        if len(inputs) != 1 or len(shapes) != 1:
            raise CnnforgeError(
                f"{path} has {len(inputs)} inputs ({names}); name each: --shape NAME=DIMS"
            )
        shapes = {inputs[0].name: shapes[None]}
    unknown = sorted(str(name) for name in set(shapes) - {i.name for i in inputs})
    if unknown:
        raise CnnforgeError(f"--shape names {', '.join(unknown)}, but {path} has inputs {names}")
    feeds = []
    for graph_input in inputs:
        if graph_input.name not in shapes:
            raise CnnforgeError(
                f"input {graph_input.name!r} of {path} needs a shape too: "
                f"add --shape {graph_input.name}=DIMS"
            )
        feeds.append(_fit(graph_input, shapes[graph_input.name], path))
    return feeds


def _fit(graph_input: onnxinfo.TensorInfo, per_item: tuple[int, ...], path: str) -> Feed:
    dims = list(graph_input.shape)
    if len(dims) != len(per_item) + 1:
        raise CnnforgeError(
            f"input {graph_input.name!r} of {path} has dims {dims}, so --shape needs "
            f"{len(dims) - 1} per-item dims (batch axis left out), got {'x'.join(map(str, per_item))}"
        )
    if any(isinstance(d, int) and d != g for d, g in zip(dims[1:], per_item, strict=True)):
        raise CnnforgeError(
            f"--shape {'x'.join(map(str, per_item))} does not fit input {graph_input.name!r} of "
            f"{path}, whose dims are {dims}; give the fixed ones as they are"
        )
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return Feed(graph_input.name, graph_input.dtype, per_item, fixed)


def _batch_sizes(feeds: list[Feed], asked: tuple[int, ...] | None, path: str) -> tuple[int, ...]:
    fixed = {f.fixed_batch for f in feeds if f.fixed_batch}
    if not fixed:
        return asked or DEFAULT_BATCH_SIZES
    batch = max(fixed)
    if len(fixed) > 1 or (asked and asked != (batch,)):
        raise CnnforgeError(
            f"{path} has a fixed batch size of {batch} (inputs "
            f"{', '.join(f'{f.name}: {f.fixed_batch}' for f in feeds)}); run it with --batch-sizes {batch}"
        )
    return (batch,)


def describe_model(
    path: Path | str, *, batch_sizes: tuple[int, ...] | None = None, shapes: Shapes | None = None
) -> BenchModel:
    """What to feed ``path`` and how much work one image is, read from the graph alone."""
    proto = onnxinfo.load(path)
    if not proto.graph.node:
        raise CnnforgeError(f"ONNX model {path} has an empty graph; is it a complete .onnx file?")
    meta = _metadata(proto)
    if shapes:
        feeds, layout = _given_feeds(proto, shapes, str(path)), None
        flops = onnxinfo.flops_per_image(proto, {f.name: f.shape for f in feeds})
    else:
        feeds, layout = _image_feeds(proto, str(path))
        flops = onnxinfo.flops_per_image(proto)
    pixel_range = meta.get("pixel_range")
    low, high = pixel_range if isinstance(pixel_range, list) and len(pixel_range) == 2 else (0, 1)
    precision = meta.get("precision")
    return BenchModel(
        str(path),
        str(precision) if precision else Path(path).stem,
        str(precision) if precision else None,
        layout,
        tuple(feeds),
        flops or None,
        _batch_sizes(feeds, batch_sizes, str(path)),
        (float(low), float(high)),
        str(meta["source"]) if meta.get("source") else None,
    )


def unique_labels(models: list[BenchModel]) -> None:
    """Label by precision (else file name); where labels clash, by file name and precision."""
    labels = [m.label for m in models]
    if len(set(labels)) == len(labels):
        return
    for model in models:
        stem = Path(model.path).stem
        model.label = f"{stem}:{model.precision}" if model.precision else stem
    if len({m.label for m in models}) < len(models):
        for model in models:
            model.label = model.path
