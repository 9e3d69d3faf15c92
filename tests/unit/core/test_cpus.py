"""available_cpus: the affinity and the cgroup CPU quotas, read from a fake file system root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnnforge.core.cpus import available_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


V2 = "sys/fs/cgroup"
V1 = "sys/fs/cgroup/cpu,cpuacct"


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        # cgroup v2, the container's own namespace: its group is the mount's root
        ({"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "200000 100000\n"}, 2),
        # cgroup v2, no limit
        ({"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "max 100000\n"}, None),
        # cgroup v2, a fractional quota rounds down
        ({"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "150000 100000\n"}, 1),
        # cgroup v2, a group below its parent: the parent's smaller quota holds
        (
            {
                "proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                f"{V2}/kubepods/pod1/c1/cpu.max": "max 100000\n",
                f"{V2}/kubepods/pod1/cpu.max": "100000 100000\n",
                f"{V2}/kubepods/cpu.max": "800000 100000\n",
            },
            1,
        ),
        # cgroup v1, cpu and cpuacct mounted together
        (
            {
                "proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n",
                f"{V1}/cpu.cfs_quota_us": "300000\n",
                f"{V1}/cpu.cfs_period_us": "100000\n",
            },
            3,
        ),
        # cgroup v1, no quota (-1)
        (
            {
                "proc/self/cgroup": "2:cpu:/\n",
                "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
            },
            None,
        ),
        # nothing readable: the affinity alone
        ({}, None),
    ],
)
def test_available_cpus_is_the_least_of_affinity_and_cgroup_quota(tmp_path, files, quota):
    root = _write(tmp_path, files)
    expected = AFFINITY if quota is None else min(quota, AFFINITY)
    assert available_cpus(root) == expected


def test_a_quota_below_the_affinity_wins(tmp_path):
    """A container limited to 1 CPU on a machine this process sees every CPU of."""
    root = _write(tmp_path, {"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "100000 100000\n"})
    assert available_cpus(root) == 1
    root = _write(tmp_path / "big", {"proc/self/cgroup": "0::/\n", f"{V2}/cpu.max": "max 1000\n"})
    assert available_cpus(root) == AFFINITY


def test_onnxruntime_threads_follow_a_cpu_limit_the_user_did_not_override(tmp_path, monkeypatch):
    """A process limited to 1 CPU of a 64-core machine gets a 1-thread intra-op pool; without
    a limit onnxruntime keeps its own default (0); ``threads=`` always wins."""
    from tiny_onnx import conv_classifier, save

    from cnnforge.deploy.runtime import open_session

    model = save(conv_classifier(), tmp_path / "m.onnx")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    threads = lambda **kw: open_session(model, **kw).get_session_options().intra_op_num_threads  # noqa: E731
    assert threads() == 1 and threads(threads=3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert threads() == 0


@pytest.mark.slow  # a fresh process importing TensorFlow: about 13 s
@pytest.mark.skipif(AFFINITY < 2, reason="needs two CPUs to limit the process to one")
@pytest.mark.parametrize("user_set", [False, True])
def test_tensorflow_threads_follow_a_cpu_limit_the_user_did_not_override(user_set):
    """TensorFlow's pools, in a fresh process pinned to one CPU: sized 1 when the user set
    nothing, left alone when ``TF_NUM_INTRAOP_THREADS``/``TF_NUM_INTEROP_THREADS`` are set."""
    import subprocess
    import sys

    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "import cnnforge.modeling, tensorflow as tf\n"
        "t = tf.config.threading\n"
        "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_NUM_")}
    if user_set:
        env.update(TF_NUM_INTRAOP_THREADS="2", TF_NUM_INTEROP_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == (["0", "0"] if user_set else ["1", "1"])
