"""The command line of a small real search run as a process of its own (``python -m
cnnforge.cli search``), for the tests that kill, resume or distribute one."""

from __future__ import annotations

import sys
from pathlib import Path

# A narrow space, so that every trial is quick and a few of them cover it.
SMALL_SPACE = (
    "--patience",
    "0",
    "--fix",
    "conv_blocks=2",
    "--space",
    "filters_0=16,32",
    "--space",
    "dense_units_0=32,64",
)


def small_search(data: Path, run_dir: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cnnforge.cli",
        "search",
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        *SMALL_SPACE,
        *options,
    ]
