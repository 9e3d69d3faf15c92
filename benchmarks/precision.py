"""fp32, fp16 and int8 (and fp32 channels-first) variants of one run's model, side by side.

Exports each variant with `cnnforge.conversion.export` (parity and the accuracy gate included), then, in
this one process, measures file size, onnxruntime test accuracy, and latency at batch 1 and 32.
The variants are timed in interleaved rounds (fp32, fp16, int8, nchw, fp32, ...), so a slow
spell of a shared machine hits them all alike. Prints a Markdown table for docs/deployment.md.

    python benchmarks/precision.py runs/latest [--rounds 5] [--iterations 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import onnxruntime

import cnnforge
from cnnforge.bench.machine import cpu_name
from cnnforge.conversion.export import export
from cnnforge.core.errors import CnnforgeWarning
from cnnforge.core.markdown import markdown_table
from cnnforge.data.dataset import load_dataset
from cnnforge.deploy.runtime import open_session, to_layout
from cnnforge.deploy.timing import latency_stats, time_calls

VARIANTS = {  # name: (precision, layout)
    "fp32": ("fp32", "NHWC"),
    "fp16": ("fp16", "NHWC"),
    "int8": ("int8", "NHWC"),
    "fp32 nchw": ("fp32", "NCHW"),
}
BATCH_SIZES = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before export imports TensorFlow
    cnnforge.load_plugins()

    exported = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CnnforgeWarning)  # fp16 on CPU: the table shows it
        for name, (precision, layout) in VARIANTS.items():
            exported[name] = export(args.run_dir, precision=precision, layout=layout)
            print(f"exported {name}: {exported[name].onnx_path}", file=sys.stderr)

    data = exported["fp32"].accuracy.data
    images = load_dataset(data).x_test.astype(np.float32)
    sessions = {
        name: open_session(r.onnx_path, threads=args.threads) for name, r in exported.items()
    }
    times: dict[tuple[str, int], list[float]] = {}
    for batch_size in BATCH_SIZES:
        for _ in range(args.rounds):
            for name, session in sessions.items():
                feed = {"images": to_layout(images[:batch_size], exported[name].layout)}
                times.setdefault((name, batch_size), []).extend(
                    time_calls(
                        lambda s=session, f=feed: s.run(None, f),
                        warmup=args.warmup,
                        iterations=args.iterations,
                    )
                )

    stats = {key: latency_stats(t) for key, t in times.items()}
    rows = []
    for name, result in exported.items():
        p50 = {b: stats[(name, b)]["p50"] for b in BATCH_SIZES}
        base = {b: stats[("fp32", b)]["p50"] for b in BATCH_SIZES}
        rows.append(
            [
                name,
                f"{result.size_bytes / 1024:.0f} KiB",
                f"{result.accuracy.onnxruntime:.2%}",
                f"{result.accuracy.drop_points:+.2f}",
                *(f"{p50[b]:.3f}" for b in BATCH_SIZES),
                f"{32 / (stats[(name, 32)]['mean'] / 1e3):,.0f}",
                *(f"{base[b] / p50[b]:.2f}×" for b in BATCH_SIZES),
            ]
        )
    headers = [
        "variant",
        "file",
        "test accuracy (onnxruntime)",
        "points lost vs Keras",
        "p50 ms, batch 1",
        "p50 ms, batch 32",
        "images/s, batch 32",
        "speed-up batch 1",
        "speed-up batch 32",
    ]
    print(
        f"\nKeras test accuracy: {exported['fp32'].accuracy.keras:.2%} on "
        f"{exported['fp32'].accuracy.images} test images of {data}"
    )
    print(
        f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, {os.cpu_count()} cores, onnxruntime "
        f"{onnxruntime.__version__}, threads {args.threads or 'default'}; {args.rounds} rounds × "
        f"{args.iterations} timed calls per variant and batch size, interleaved\n"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
