"""A command run as a process of its own under a resident-memory ceiling, and its peak.

A watchdog thread sums the resident memory of the process and its descendants every few
milliseconds and kills the whole process group once it passes ``kill_above`` bytes, so a
runaway never reaches the machine's OOM killer. The peak reported is the kernel's high-water mark
of the command's own process (``VmHWM``, read every 20 ms while it runs) plus its
descendants' resident memory at the sample where that sum was largest. Not ``ru_maxrss``: the
kernel carries the high-water mark of the memory a child was started from across its exec
(``vfork``), so a child of a big pytest worker reports the worker's peak.
Usable as a script too: ``python tests/memory.py LIMIT_GB -- command...`` prints the peak.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
GB = 1024**3


@dataclass
class Measured:
    returncode: int
    peak_rss: int  # bytes: the largest resident set the process reached
    killed: bool  # the watchdog killed it above its ceiling
    output: str


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                queue += [int(child) for child in task.read_text().split()]
            except OSError:
                continue
    return found


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _high_water(pid: int) -> int:
    """The most resident memory ``pid`` has had since its exec (``VmHWM``), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _tree_rss(pid: int) -> int:
    return sum(_rss(member) for member in _descendants(pid))


def _kill(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def run_measured(
    command: list[str], *, kill_above: int, timeout: float, env: dict | None = None
) -> Measured:
    """Run ``command``; kill its process group above ``kill_above`` resident bytes or after
    ``timeout`` seconds."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    killed = threading.Event()
    done = threading.Event()
    peak = [0]

    def watch() -> None:
        while not done.wait(0.02):
            tree = _tree_rss(process.pid)
            own = _rss(process.pid)
            peak[0] = max(peak[0], _high_water(process.pid) + tree - own)
            if tree > kill_above:
                killed.set()
                _kill(process.pid)
                return

    timer = threading.Timer(timeout, lambda: _kill(process.pid))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    timer.start()
    reader = threading.Thread(target=lambda: chunks.append(process.stdout.read()), daemon=True)
    chunks: list[bytes] = []
    reader.start()
    try:
        process.wait()
    finally:
        done.set()
        timer.cancel()
    watcher.join()
    reader.join()
    return Measured(
        process.returncode,
        peak[0],
        killed.is_set(),
        b"".join(chunks).decode(errors="replace"),
    )


if __name__ == "__main__":
    limit, _, *argv = sys.argv[1:]
    result = run_measured(argv, kill_above=int(float(limit) * GB), timeout=3600)
    print(result.output[-3000:])
    print(
        f"exit {result.returncode}, peak RSS {result.peak_rss / GB:.2f} GiB"
        f"{', KILLED above the limit' if result.killed else ''}"
    )
