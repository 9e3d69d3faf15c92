"""``cnnforge data``: what a data source holds, before anything trains.

An image folder is summarised from its file headers (nothing decoded but a small timed sample):
classes and their counts per split (imbalance flagged), image sizes (quantiles and a histogram
of the longer side), modes, files ignored and skipped and why, the preprocessing that would be
used, and how long reading one epoch would take. Other sources (arrays) are loaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnforge.core.preprocessing import Preprocessing
from cnnforge.data.dataset import load_dataset, parse_source
from cnnforge.data.decoding import decode_all, pool_workers
from cnnforge.data.folders import FolderScan, scan_image_folder
from cnnforge.data.stream import cache_place

# A class this many times smaller than the largest is flagged as imbalanced.
IMBALANCE_RATIO = 3.0
SIZE_BINS = (16, 32, 64, 128, 256, 512, 1024, 2048)
TIMED_SAMPLE = 48


@dataclass
class DataSummary:
    source: str
    class_names: tuple[str, ...]
    counts: dict[str, list[int]]  # split → images per class
    preprocessing: Preprocessing
    modes: dict[str, int] = field(default_factory=dict)
    size_quantiles: dict[str, list[int]] = field(default_factory=dict)  # width/height → q0..q4
    longer_side_histogram: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    epoch_read_s: float | None = None  # None: held in memory
    read_images_per_s: float | None = None
    read_workers: int | None = None  # the processes the reader decodes its largest split in
    layout: str | None = None  # an image folder's: split folders or class folders, one line
    disk_cache: str | None = None  # an image folder's: where streamed epochs cache pixels

    @property
    def images(self) -> int:
        return sum(sum(c) for c in self.counts.values())

    @property
    def class_totals(self) -> list[int]:
        return [int(sum(t)) for t in zip(*self.counts.values(), strict=True)]

    @property
    def imbalance(self) -> float | None:
        """The largest class's count over the smallest's; None when a class has no images
        (no ratio, and JSON has no infinity)."""
        totals = self.class_totals
        return None if min(totals) == 0 else max(totals) / min(totals)

    @property
    def imbalanced(self) -> bool:
        """A class has :data:`IMBALANCE_RATIO` times the images of another, or one has none."""
        return self.imbalance is None or self.imbalance >= IMBALANCE_RATIO

    def as_dict(self) -> dict[str, Any]:
        saved = asdict(self)
        saved["preprocessing"] = self.preprocessing.to_json()
        saved.update(images=self.images, imbalance=self.imbalance, imbalanced=self.imbalanced)
        return saved


def summarize(source: str, preprocessing: Preprocessing | None = None) -> DataSummary:
    """What ``source`` holds and how it would be read (``preprocessing``: what is asked for)."""
    name, path = parse_source(source)
    if name == "dir" and path:
        return _folder_summary(source, scan_image_folder(path), preprocessing)
    data = load_dataset(source, preprocessing=preprocessing)
    classes = data.spec.num_classes
    counts = {
        split: np.bincount(y, minlength=classes).tolist()
        for split, y in (("train", data.y_train), ("val", data.y_val), ("test", data.y_test))
    }
    height, width, _ = data.spec.input_shape
    return DataSummary(
        source,
        data.spec.class_names,
        counts,
        data.preprocessing,
        size_quantiles={"width": [width] * 5, "height": [height] * 5},
    )


def _folder_summary(source: str, scan: FolderScan, requested: Preprocessing | None) -> DataSummary:
    chosen = scan.preprocessing(requested)
    images = scan.images
    sizes = np.array([image.size for image in images])
    modes: dict[str, int] = {}
    for image in images:
        modes[image.mode] = modes.get(image.mode, 0) + 1
    per_image = _time_reading(images, chosen)
    # the reader decodes each split apart, in as many processes as pool_workers gives it
    workers = {split: pool_workers(len(files)) for split, files in scan.splits.items()}
    epoch_s = sum(per_image * len(files) / workers[s] for s, files in scan.splits.items())
    return DataSummary(
        source,
        scan.class_names,
        {split: scan.counts(split) for split in scan.splits},
        chosen,
        modes=dict(sorted(modes.items(), key=lambda kv: -kv[1])),
        size_quantiles={
            axis: [int(v) for v in np.quantile(sizes[:, i], [0, 0.25, 0.5, 0.75, 1])]
            for i, axis in enumerate(("width", "height"))
        },
        longer_side_histogram=_histogram(sizes.max(axis=1)),
        skipped=scan.skipped,
        ignored=scan.ignored,
        epoch_read_s=epoch_s,
        read_images_per_s=len(images) / epoch_s if epoch_s else None,
        read_workers=max(workers.values()),
        layout=scan.layout,
        disk_cache=cache_place().describe(),
    )


def _time_reading(images: list, preprocessing: Preprocessing) -> float:
    """Seconds one process takes to decode and preprocess one image (an evenly spread sample),
    by the function the reader decodes with (unreadable images are skipped, as it skips them)."""
    step = max(1, len(images) // TIMED_SAMPLE)
    sample = [str(image.path) for image in images[::step][:TIMED_SAMPLE]]
    start = time.perf_counter()
    _, failed = decode_all(sample, preprocessing)
    return (time.perf_counter() - start) / max(1, len(sample) - len(failed))


def _histogram(longer_sides: np.ndarray) -> dict[str, int]:
    """Images by their longer side: ``<=16``, ``17-32`` … ``>2048``."""
    edges = (0, *SIZE_BINS)
    histogram = {}
    for low, high in zip(edges, edges[1:], strict=False):
        count = int(np.sum((longer_sides > low) & (longer_sides <= high)))
        if count:
            histogram[f"{low + 1}-{high}" if low else f"<={high}"] = count
    above = int(np.sum(longer_sides > SIZE_BINS[-1]))
    if above:
        histogram[f">{SIZE_BINS[-1]}"] = above
    return histogram
