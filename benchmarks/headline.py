"""Headline figures, measured in one run on this machine: onnxruntime against the same model in
Keras (a ``tf.function`` call, in the same process), achieved GFLOP/s and share of the
machine's measured fp32 MatMul peak, for

- the seed CNN: ``simple_cnn`` with its defaults (the TensorFlow CIFAR-10 tutorial CNN), 32×32×3;
- a backbone-sized model: MobileNetV2 (random weights; speed does not depend on them), 96×96×3,
  with a 10-class softmax head.

Usage: python benchmarks/headline.py [--out DIR] [--min-duration SECONDS] [--threads 1,2]

It prints a Markdown summary (what docs/benchmarks.md shows) and writes each model's full
results (JSON, CSV, Markdown, plots) under --out. Speed-ups are ratios of medians measured in
the same run: on a shared machine, absolute times drift from run to run, ratios much less.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def seed_cnn():
    import keras_tuner

    import cnnforge
    from cnnforge.data.dataset import DataSpec
    from cnnforge.modeling.hypermodel import build_model

    spec = DataSpec("cifar-like", (32, 32, 3), tuple(str(i) for i in range(10)))
    return build_model(
        cnnforge.get("architecture", "simple_cnn"), spec, keras_tuner.HyperParameters()
    )


def mobilenet_v2():
    import keras

    inputs = keras.Input((96, 96, 3), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    features = keras.applications.MobileNetV2(
        weights=None, input_shape=(96, 96, 3), include_top=False, pooling="avg"
    )(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(features)
    return keras.Model(inputs, outputs, name="mobilenet_v2_96")


def measure(name, model, folder, args):
    from cnnforge.bench.output import write_outputs
    from cnnforge.bench.sweep import benchmark
    from cnnforge.conversion.export import to_onnx
    from cnnforge.core.atomic import atomic_write_bytes

    path = folder / f"{name}.onnx"
    atomic_write_bytes(path, to_onnx(model, metadata={"precision": "fp32"}).SerializeToString())
    report = benchmark(
        path,
        batch_sizes=(1, 32),
        threads=args.threads,
        keras_model=model,
        warmup=10,
        min_iterations=args.min_iterations,
        min_duration_s=args.min_duration,
        progress=lambda m: print(f"  {name}: {m}", file=sys.stderr),
    )
    write_outputs(report, args.out / name)
    return report


def summary_lines(name, report):
    from cnnforge.bench.output import number

    flops = report.models[0].flops_per_image
    keras = {k.batch_size: k for k in report.keras}
    lines = [
        f"**{name}**: {flops / 1e6:.1f} MFLOP per image (from the ONNX graph)",
        "",
        "| batch | threads | onnxruntime p50 ms [95% CI] | Keras tf.function p50 ms [95% CI] "
        "| speed-up | GFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report.results, key=lambda r: (r.batch_size, r.threads or 0)):
        k = keras[r.batch_size]
        lines.append(
            f"| {r.batch_size} | {r.threads} | {number(r.latency_ms['p50'])} "
            f"[{number(r.p50_ci_ms[0])}–{number(r.p50_ci_ms[1])}] | {number(k.latency_ms['p50'])} "
            f"[{number(k.p50_ci_ms[0])}–{number(k.p50_ci_ms[1])}] | "
            f"{r.speedup_vs_keras:.1f}× | {number(r.gflops)} | {r.peak_share:.1%} |"
        )
    peaks = ", ".join(
        f"{p.gflops:.1f} GFLOP/s at {p.threads} thread(s) (N = {p.matrix_size})"
        for p in report.peaks
    )
    lines += [
        "",
        f"Peak measured in this model's run (fp32 onnxruntime MatMul N x N by N x N, "
        f"N in 256, 512, 1024, best call): {peaks}.",
    ]
    lines += [
        "",
        "Keras at its own threads (TensorFlow's default) achieves "
        + ", ".join(f"{number(k.gflops)} GFLOP/s at batch {k.batch_size}" for k in report.keras)
        + ".",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-headline"))
    parser.add_argument("--min-duration", type=float, default=2.0)
    parser.add_argument("--min-iterations", type=int, default=50)
    parser.add_argument(
        "--threads", type=lambda s: tuple(int(t) for t in s.split(",")), default=(1, 2)
    )
    args = parser.parse_args()
    import cnnforge

    cnnforge.load_plugins()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        reports = {
            "seed CNN (simple_cnn defaults, 32x32x3)": measure(
                "seed_cnn", seed_cnn(), Path(tmp), args
            ),
            "MobileNetV2 (96x96x3, 10 classes)": measure(
                "mobilenet_v2", mobilenet_v2(), Path(tmp), args
            ),
        }
    first = next(iter(reports.values()))
    env = first.environment
    print(
        f"Measured {env['measured_at']} on {env['cpu']}, {env['cores']} cores, onnxruntime "
        f"{env['onnxruntime']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}; "
        f"load average {env['load_average_before'][0]} at the start and "
        f"{list(reports.values())[-1].environment['load_average_after'][0]} at the end "
        f"(a shared machine); {time.perf_counter() - started:.0f} s in all."
    )
    for name, report in reports.items():
        print("")
        print("\n".join(summary_lines(name, report)))


if __name__ == "__main__":
    main()
