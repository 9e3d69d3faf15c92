"""TensorFlow's thread pools sized by the CPUs this process may really use.

TensorFlow sizes its intra- and inter-op pools from the CPUs it sees, not from a cgroup CPU
quota: in a container limited to 2 CPUs on a 64-core host it runs 64-thread pools on 2 CPUs'
time. Where such a limit exists (``cnnforge.core.cpus.quota_limited_cpus``) and the user set
neither pool (``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS``, or
``tf.config.threading``), both are sized to it. Pools can be set only before TensorFlow's
runtime starts, so this runs when ``cnnforge.modeling`` is first imported, which every stage
that uses TensorFlow does first.
"""

from __future__ import annotations

import os

from cnnforge.core.cpus import quota_limited_cpus


def size_tensorflow_threads() -> None:
    """Size TensorFlow's unset pools to the CPU limit, if there is one (see the module)."""
    cpus = quota_limited_cpus()
    if cpus is None:
        return
    import tensorflow as tf

    threading = tf.config.threading
    pools = (
        (
            "TF_NUM_INTRAOP_THREADS",
            threading.get_intra_op_parallelism_threads,
            threading.set_intra_op_parallelism_threads,
        ),
        (
            "TF_NUM_INTEROP_THREADS",
            threading.get_inter_op_parallelism_threads,
            threading.set_inter_op_parallelism_threads,
        ),
    )
    for env, get, set_threads in pools:
        if os.environ.get(env) or get():
            continue  # the user's
        try:
            set_threads(cpus)
        except RuntimeError:  # the runtime has started: its pools are already made
            return
