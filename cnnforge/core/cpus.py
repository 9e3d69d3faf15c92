"""How many CPUs this process may really use: the fewest of its CPU affinity and the CPU quota
of its control group (cgroup v2 ``cpu.max``, cgroup v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, this group's and every parent's).

``os.cpu_count()`` and ``os.sched_getaffinity`` ignore quotas: a container limited to 2 CPUs on
a 64-core host sees 64, and 64 decoding processes or 64 inference threads share 2 CPUs' time.
Every pool cnnforge sizes itself (decoding workers, TensorFlow's and onnxruntime's threads
where the user set none) is sized by :func:`available_cpus`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("sys/fs/cgroup")
_V1_CPU_MOUNTS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")


def available_cpus(root: Path | str = "/") -> int:
    """The CPUs this process may use: the minimum of its affinity and its cgroup CPU quotas (a
    fractional quota rounds down, at least 1). ``root`` is the file system root that ``proc/``
    and ``sys/fs/cgroup/`` are read under (tests give a fake one)."""
    root = Path(root)
    cpus = [_affinity(), *_cgroup_v2_quotas(root), *_cgroup_v1_quotas(root)]
    return max(1, min(cpus))


def quota_limited_cpus() -> int | None:
    """:func:`available_cpus` where it is below the machine's CPU count (an affinity or a
    quota limits this process), else None: a library's own default (onnxruntime's physical
    cores, TensorFlow's) then stands."""
    cpus = available_cpus()
    return cpus if cpus < (os.cpu_count() or cpus) else None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cgroup_paths(root: Path, hierarchy: str) -> list[str]:
    """This process's cgroup paths in ``/proc/self/cgroup`` for a hierarchy: ``""`` is the
    unified (v2) one; else a v1 controller (``cpu``)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    paths = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy in (controllers.split(",") if controllers else [""]):
            paths.append(path)
    return paths


def _group_and_parents(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup folder of ``path`` under ``mount`` and each parent up to ``mount``; just
    ``mount`` when the folder is not there (in a container the group is often the mount's
    root itself)."""
    folder = mount / path.strip("/")
    if not folder.is_dir():
        yield mount
        return
    while folder != mount:
        yield folder
        folder = folder.parent
    yield mount


def _cgroup_v2_quotas(root: Path) -> Iterator[int]:
    """CPUs ``cpu.max`` allows (``QUOTA PERIOD``; ``max`` is no limit), this group and up."""
    mount = root / CGROUP_ROOT
    for path in _cgroup_paths(root, ""):
        for folder in _group_and_parents(mount, path):
            fields = _read(folder / "cpu.max").split()
            if len(fields) == 2 and fields[0] != "max":
                yield _cpus(fields[0], fields[1])


def _cgroup_v1_quotas(root: Path) -> Iterator[int]:
    """CPUs ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` allow (-1 is no limit), this group
    and up."""
    mount = next(
        (root / CGROUP_ROOT / m for m in _V1_CPU_MOUNTS if (root / CGROUP_ROOT / m).is_dir()), None
    )
    if mount is None:
        return
    for path in _cgroup_paths(root, "cpu"):
        for folder in _group_and_parents(mount, path):
            quota = _read(folder / "cpu.cfs_quota_us")
            period = _read(folder / "cpu.cfs_period_us")
            if quota and period and not quota.startswith("-"):
                yield _cpus(quota, period)


def _cpus(quota: str, period: str) -> int:
    try:
        return max(1, math.floor(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return 1 << 30  # unreadable: no limit


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
