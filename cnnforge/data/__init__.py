"""Stage 1, data: a source string (``NAME``, ``NAME:PATH``, ``dir:FOLDER``, ``FILE.npz``) →
a checked ``Dataset`` (``DataSpec`` + train / validation / test arrays, raw 0-255 pixels).

Dataset plugins return ``RawData``; the readers here decode common on-disk formats for them.
"""

from cnnforge.data.dataset import (
    Dataset,
    DataSpec,
    RawData,
    as_dataset,
    load_dataset,
    stratified_split,
)
from cnnforge.data.folders import FolderScan, read_image_folder, scan_image_folder
from cnnforge.data.readers import read_cifar, read_idx, read_idx_folder, read_npz

__all__ = [
    "DataSpec",
    "Dataset",
    "FolderScan",
    "RawData",
    "as_dataset",
    "load_dataset",
    "read_cifar",
    "read_idx",
    "read_idx_folder",
    "read_image_folder",
    "read_npz",
    "scan_image_folder",
    "stratified_split",
]
