"""onnxruntime CPU latency of every registered backbone's exported classifier, at native size.

Each backbone is built the way a search builds it with its default hyperparameters (native
image size, average pooling, dropout head, 10 classes) on colour images of its native size, so
the model does no resizing; the weights do not change the latency, so none are loaded. The
classifier is exported with ``cnnforge.conversion.export.to_onnx``, checked against Keras on 8 images,
then timed by ``cnnforge bench`` in its own process:

    python benchmarks/backbone_latency.py [--out runs/backbone_latency] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

import cnnforge

# Iterations per batch size: fewer for the backbones whose batch of 32 takes seconds.
ITERATIONS = {"resnet50": 10, "densenet121": 10, "convnext_tiny": 10, "efficientnet_b2": 20}
DEFAULT_ITERATIONS = 30
WARMUP = 3


def export_classifier(name: str, out: Path) -> dict:
    """Build ``name`` at its native size, export it, check parity; where and how big."""
    import keras
    import keras_tuner

    from cnnforge.conversion.export import to_onnx
    from cnnforge.conversion.parity import check_parity
    from cnnforge.core.atomic import atomic_write_bytes
    from cnnforge.data.dataset import DataSpec
    from cnnforge.modeling.hypermodel import build_model

    plugin = cnnforge.get("backbone", name)
    size = plugin.info["native_size"]
    spec = DataSpec("imagenet-sized", (size, size, 3), tuple(str(i) for i in range(10)))
    model = build_model(plugin, spec, keras_tuner.HyperParameters())
    onnx_bytes = to_onnx(model).SerializeToString()
    images = np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype("float32")
    parity = check_parity(model, onnx_bytes, images, inputs="random", batch_sizes=(1, 4))
    path = out / f"{name}.onnx"
    atomic_write_bytes(path, onnx_bytes)
    keras.backend.clear_session()
    return {
        "size": size,
        "params": model.count_params(),
        "onnx_mb": len(onnx_bytes) / 1e6,
        "parity": parity.summary(),
        "onnx": path,
    }


def bench(path: Path, iterations: int) -> dict[int, dict]:
    """``cnnforge bench`` as a user types it; batch size → its result."""
    json_path = path.with_suffix(".bench.json")
    command = [
        "cnnforge",
        "bench",
        str(path),
        "--batch-sizes",
        "1,32",
        "--threads",
        "2",
        "--warmup",
        str(WARMUP),
        "--iterations",
        str(iterations),
        "--json",
        str(json_path),
    ]
    print("$", shlex.join(command), flush=True)
    executable = str(Path(sys.executable).with_name("cnnforge"))
    subprocess.run([executable, *command[1:]], check=True, stdout=subprocess.DEVNULL)
    return {row["batch_size"]: row for row in json.loads(json_path.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/backbone_latency"))
    parser.add_argument("--only", help="Comma-separated backbone names (default: all).")
    args = parser.parse_args()
    cnnforge.load_plugins()
    names = (
        args.only.split(",")
        if args.only
        else [p.name for p in cnnforge.list_plugins(kind="backbone")]
    )
    rows = []
    for name in names:
        exported = export_classifier(name, args.out)
        print(f"{name}: parity {exported['parity']}", flush=True)
        iterations = ITERATIONS.get(name, DEFAULT_ITERATIONS)
        timed = bench(exported["onnx"], iterations)
        rows.append((name, exported, iterations, timed))

    env = next(iter(rows[0][3].values()))["environment"]
    print(f"\n{env['cpu']}, {env['cores']} cores, onnxruntime {env['onnxruntime']}, 2 threads")
    print(
        "| backbone | input | parameters | ONNX MB | batch 1 p50 ms | batch 32 p50 ms | "
        "batch 32 images/s | iterations |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, exported, iterations, timed in rows:
        one, many = timed[1], timed[32]
        print(
            f"| {name} | {exported['size']}x{exported['size']}x3 | "
            f"{exported['params'] / 1e6:.1f}M | {exported['onnx_mb']:.1f} | "
            f"{one['latency_ms']['p50']:.1f} | {many['latency_ms']['p50']:.0f} | "
            f"{many['throughput']:.0f} | {iterations} |"
        )


if __name__ == "__main__":
    main()
