"""Image folders: ``FOLDER/CLASS/…`` (or ``FOLDER/train|val|validation|test/CLASS/…``) of
images of any sizes and modes → raw arrays at one size, by one ``Preprocessing``.

Scanning reads only file headers (size, mode, EXIF orientation): hidden files and folders and
files that are not images are ignored and counted, images whose header cannot be read are
skipped with the reason. Decoding (in worker processes, ``cnnforge.data.decoding``) skips
images whose pixels cannot be read. Skipped images are a warning with their
count, or with ``strict`` an error; ``FolderRead.skipped`` lists them for the run directory.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.core.imagefiles import IMAGE_SUFFIXES, open_image_file
from cnnforge.core.preprocessing import Preprocessing
from cnnforge.data.dataset import RawData, stratified_split
from cnnforge.data.decoding import DecodePool, decode_all, reason
from cnnforge.data.stream import MEMORY_ENV, ImageFiles, memory_bound_bytes

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
EXIF_ORIENTATION = 0x0112
_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: int
    size: tuple[int, int]  # (W, H) upright
    mode: str


@dataclass
class FolderScan:
    """What a folder holds, from the file headers: the images of each split (``all`` when the
    folder has no split subfolders), what was ignored and what was skipped, and why."""

    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, list[ImageFile]]
    ignored: dict[str, int] = field(default_factory=dict)  # reason → count
    skipped: dict[str, str] = field(default_factory=dict)  # path → reason
    layout: str = "layout: class folders at the top"  # one line: how the folder was read

    @property
    def images(self) -> list[ImageFile]:
        return [image for files in self.splits.values() for image in files]

    def counts(self, split: str | None = None) -> list[int]:
        """Images per class (of one split, or of all)."""
        files = self.splits.get(split, []) if split else self.images
        counts = np.bincount([f.label for f in files], minlength=len(self.class_names))
        return [int(c) for c in counts]

    def preprocessing(self, requested: Preprocessing | None = None) -> Preprocessing:
        """``requested`` with its open parts (size, colour mode) decided from these images."""
        images = self.images
        return (requested or Preprocessing()).resolved(
            [i.size for i in images], [i.mode for i in images]
        )


def scan_image_folder(folder: Path | str) -> FolderScan:
    """The images of ``folder`` and their classes, from their headers (nothing decoded)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CnnforgeError(f"image folder {root} does not exist; give a folder of class folders")
    ignored: dict[str, int] = {}
    skipped: dict[str, str] = {}
    top = _visible_folders(root, ignored)
    split_dirs = _split_folders(top)
    if split_dirs:
        if "train" not in split_dirs:
            raise CnnforgeError(
                f"image folder {root} has {', '.join(p.name + '/' for p in split_dirs.values())} "
                "but no train/; add train/CLASS/… or put the class folders at the top"
            )
        names = _class_names(split_dirs["train"], ignored)
        splits = {
            split: _split_files(path, names, split, ignored, skipped)
            for split, path in split_dirs.items()
        }
    else:
        names = _class_names(root, ignored)
        splits = {"all": _split_files(root, names, None, ignored, skipped)}
    scan = FolderScan(root, tuple(names), splits, ignored, skipped, _layout(top, split_dirs))
    _check_classes(scan)
    log.info("%s: %s", root, scan.layout)
    return scan


def _split_folders(top: list[Path]) -> dict[str, Path]:
    """The split folders (split → folder) when ``top`` is a split layout: only split names
    (train, val, validation, test) and at least one of them holding folders; else none, as
    class folders at the top may be named like a split (CIFAR-100 has a class "train")."""
    if not top or any(p.name.lower() not in SPLIT_FOLDERS for p in top):
        return {}
    if not any(_has_subfolder(p) for p in top):
        return {}
    return {SPLIT_FOLDERS[p.name.lower()]: p for p in top}


def _has_subfolder(folder: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _layout(top: list[Path], split_dirs: dict[str, Path]) -> str:
    """One line: which layout the folder was read as, and why where it could be mistaken."""
    if split_dirs:
        return f"layout: split folders {', '.join(p.name + '/' for p in top)} holding the class folders"
    like_splits = [p.name + "/" for p in top if p.name.lower() in SPLIT_FOLDERS]
    if not like_splits:
        return "layout: class folders at the top"
    return (
        f"layout: class folders at the top ({', '.join(like_splits)} "
        f"{'is a class' if len(like_splits) == 1 else 'are classes'}: a split layout has only "
        "train/, val/ or validation/, test/ at the top, holding the class folders)"
    )


def _visible_folders(folder: Path, ignored: dict[str, int]) -> list[Path]:
    folders = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            _count(ignored, "hidden")
        elif entry.is_dir():
            folders.append(entry)
        else:
            _count(ignored, "outside a class folder")
    return folders


def _class_names(folder: Path, ignored: dict[str, int]) -> list[str]:
    names = [p.name for p in _visible_folders(folder, ignored)]
    if len(names) < 2:
        raise CnnforgeError(
            f"image folder {folder} has {len(names)} class folder(s); put each class's images "
            "in its own subfolder, at least two classes"
        )
    return names


def _split_files(
    folder: Path,
    names: list[str],
    split: str | None,
    ignored: dict[str, int],
    skipped: dict[str, str],
) -> list[ImageFile]:
    present = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    extra = sorted(present - set(names))
    if extra:
        raise CnnforgeError(
            f"{folder} has class folder(s) {', '.join(extra)} that train/ lacks; every split "
            "must have the same classes"
        )
    files = []
    for label, name in enumerate(names):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise CnnforgeError(
                f"class {name!r} has no folder in {folder}; every split needs every class "
                f"(add {folder / name}/ with its images)"
            )
        for path in _walk(class_dir, ignored):
            image = _header(path, label, skipped)
            if image is not None:
                files.append(image)
    return files


def _walk(folder: Path, ignored: dict[str, int]) -> Iterator[Path]:
    """Image files under ``folder``, sorted, hidden ones and non-images counted in ``ignored``."""
    for directory, subdirs, names in os.walk(folder):
        hidden = [d for d in subdirs if d.startswith(".")]
        for d in hidden:
            subdirs.remove(d)
            _count(ignored, "hidden")
        subdirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                _count(ignored, "hidden")
            elif Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                _count(ignored, "not an image")
            else:
                yield Path(directory) / name


def _header(path: Path, label: int, skipped: dict[str, str]) -> ImageFile | None:
    try:
        with open_image_file(path) as image:
            width, height = image.size
            turned = _orientation(image) in _TURNED
            return ImageFile(
                path, label, (height, width) if turned else (width, height), image.mode
            )
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a skipped file
        skipped[str(path)] = reason(exc)
        return None


def _orientation(image: Any) -> int:
    """The EXIF orientation a header gives, without decoding the pixels: Pillow reads a PNG's
    whole file to look for an eXIf chunk after the image data, so a PNG's is taken only from
    an eXIf chunk before it (decoding applies any orientation all the same)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def _check_classes(scan: FolderScan) -> None:
    if not scan.images:
        raise CnnforgeError(
            f"image folder {scan.root} has no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    for split in scan.splits:
        where = scan.root if split == "all" else scan.root / split
        counts = scan.counts(split)
        empty = [n for n, c in zip(scan.class_names, counts, strict=True) if c == 0]
        if empty and split == "test":
            raise CnnforgeError(
                f"class(es) {', '.join(empty)} have no images in {where}; the test split needs "
                "every class (add images, or remove test/ to split one off)"
            )
        if empty and split != "val":
            raise CnnforgeError(
                f"class folder(s) {', '.join(empty)} in {where} have no readable images; add "
                "images or remove the folder"
            )


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def decode_images(
    files: list[ImageFile],
    preprocessing: Preprocessing,
    skipped: dict[str, str],
    pool: DecodePool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images and int64 labels of ``files`` by ``preprocessing``, decoded in
    worker processes (``pool``, ``cnnforge.data.decoding``); files that fail to decode go into
    ``skipped`` and are left out."""
    x, failed = decode_all([str(f.path) for f in files], preprocessing, pool)
    for index, why in failed.items():
        skipped[str(files[index].path)] = why
    labels = np.array([f.label for f in files], dtype=np.int64)
    if not failed:
        return x, labels
    ok = np.ones(len(files), dtype=bool)
    ok[list(failed)] = False
    return x[ok], labels[ok]


@dataclass(frozen=True)
class FolderData(RawData):
    """``RawData`` of an image folder, with what was made of it: the preprocessing applied,
    the files skipped (path → reason) and ignored (reason → count)."""

    skipped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)


def read_image_folder(
    folder: Path | str,
    *,
    preprocessing: Preprocessing | None = None,
    strict: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FolderData:
    """Read ``folder/CLASS/…`` (or ``folder/train/CLASS/…`` with ``val/`` or ``validation/``
    and ``test/`` where present) at one size by ``preprocessing`` (its size and colour mode
    chosen from the data where it leaves them open). Without ``test/``, a stratified seeded
    ``test_fraction`` is held out. Unreadable images are skipped with a warning, or refused
    when ``strict``."""
    scan = scan_image_folder(folder)
    refuse_if_strict(scan.skipped, strict)
    chosen = scan.preprocessing(preprocessing)
    decoded = len(scan.images) * chosen.size[0] * chosen.size[1] * chosen.channels
    if decoded > memory_bound_bytes():
        return _streamed(scan, chosen, decoded, test_fraction, seed)
    skipped, pool = dict(scan.skipped), DecodePool()
    try:
        arrays = {
            s: decode_images(files, chosen, skipped, pool) for s, files in scan.splits.items()
        }
    finally:
        pool.close()
    refuse_if_strict(skipped, strict)
    if skipped:
        warnings.warn(skipped_summary(skipped), CnnforgeWarning, stacklevel=2)
    return _folder_data(scan, arrays, chosen, skipped, test_fraction, seed)


def _streamed(
    scan: FolderScan, chosen: Preprocessing, decoded: int, test_fraction: float, seed: int
) -> FolderData:
    """The folder as ``ImageFiles`` splits, decoded while training (``cnnforge.data.stream``)."""
    mib = 1 << 20
    warnings.warn(
        f"{scan.root}: its images would take {decoded / mib:.0f} MiB decoded, over the "
        f"{memory_bound_bytes() / mib:.0f} MiB bound ({MEMORY_ENV}); they are read from disk "
        "every epoch",
        CnnforgeWarning,
        stacklevel=3,
    )
    if scan.skipped:
        warnings.warn(skipped_summary(scan.skipped), CnnforgeWarning, stacklevel=3)
    pool = DecodePool()  # one for the reader's every split and epoch
    pool.start()  # before training starts TensorFlow's threads, where it has not yet
    splits = {
        split: (
            ImageFiles([f.path for f in files], chosen, pool),
            np.array([f.label for f in files]),
        )
        for split, files in scan.splits.items()
    }
    return _folder_data(scan, splits, chosen, dict(scan.skipped), test_fraction, seed)


def _folder_data(
    scan: FolderScan,
    splits: dict[str, tuple[Any, np.ndarray]],
    chosen: Preprocessing,
    skipped: dict[str, str],
    test_fraction: float,
    seed: int,
) -> FolderData:
    """The splits (arrays or ``ImageFiles``) as ``FolderData``: a folder without ``test/``
    has a stratified, seeded ``test_fraction`` of its training images held out."""
    source = splits.pop("all", None) or (splits["train"] if "test" not in splits else None)
    if source is not None:
        x, y = source
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        splits["train"], splits["test"] = (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
    val = splits.get("val")
    return FolderData(
        *splits["train"],
        *splits["test"],
        scan.class_names,
        x_val=val[0] if val and len(val[0]) else None,
        y_val=val[1] if val and len(val[0]) else None,
        preprocessing=chosen,
        skipped=skipped,
        ignored=scan.ignored,
    )


def skipped_summary(skipped: dict[str, str], show: int = 3) -> str:
    """One line: how many images were skipped, the first few and why."""
    first = "; ".join(f"{path} ({why})" for path, why in list(skipped.items())[:show])
    more = f"; and {len(skipped) - show} more" if len(skipped) > show else ""
    return (
        f"skipped {len(skipped)} unreadable image(s): {first}{more} "
        "(--strict-data makes this an error)"
    )


def refuse_if_strict(skipped: dict[str, str], strict: bool) -> None:
    if strict and skipped:
        path, why = next(iter(skipped.items()))
        raise CnnforgeError(
            f"cannot read image {path} ({why})"
            + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else "")
            + "; remove or replace them, or drop --strict-data to skip them"
        )
