"""Transfer learning on real data, with the cnnforge command line.

Pretrain simple_cnn on Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress, coat),
then learn classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) from a few labelled images,
each way below on the same images for the same number of epochs:

- scratch: simple_cnn with its default layers, randomly initialised;
- transfer: the pretrained network up to its classifier (``--backbone run:PATH``), frozen,
  with a new softmax: the same layers and sizes as the scratch model;
- transfer below flatten: the same, but the features taken under the pretrained Dense(64)
  (``--fix backbone_layer=flatten``), with a new softmax on the 576 conv features;
- the same + fine-tuning: then every backbone layer trained at a tenth of the learning rate for
  the last third of the epochs.

Accuracy is measured by ``cnnforge run`` with onnxruntime on all 5000 test images of classes
5-9. Each seed draws its own labelled images and initialisation.

    python benchmarks/transfer_demo.py                  # full Fashion-MNIST from Debian's package
    python benchmarks/transfer_demo.py --data bundled   # the bundled 8000-image subset
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import cnnforge

FULL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def load(data: str) -> cnnforge.RawData:
    cnnforge.load_plugins()
    if data == "bundled":
        return cnnforge.get("dataset", "fashion_mnist_small").fn(None)
    return cnnforge.get("dataset", "fashion_mnist").fn(data)


def subset(raw: cnnforge.RawData, classes, path: Path, labelled: int | None, seed: int) -> Path:
    """An .npz of ``classes`` (relabelled 0..n-1); ``labelled`` stratified training images."""
    rng = np.random.default_rng(seed)
    train = []
    for cls in classes:
        idx = np.flatnonzero(raw.y_train == cls)
        train.append(rng.choice(idx, labelled // len(classes), replace=False) if labelled else idx)
    train = rng.permutation(np.concatenate(train))
    test = np.flatnonzero(np.isin(raw.y_test, classes))
    relabel = {cls: i for i, cls in enumerate(classes)}
    np.savez(
        path,
        x_train=raw.x_train[train],
        y_train=np.array([relabel[c] for c in raw.y_train[train]]),
        x_test=raw.x_test[test],
        y_test=np.array([relabel[c] for c in raw.y_test[test]]),
        class_names=np.array([raw.class_names[c] for c in classes]),
    )
    return path


def cnnforge_run(run_dir: Path, *args: str) -> dict:
    """``cnnforge run ...`` as a user types it; the test accuracy it measured, and its time."""
    command = [
        "cnnforge",
        "run",
        "--run-dir",
        str(run_dir),
        "--max-trials",
        "1",
        "--patience",
        "0",
        *args,
    ]
    print("$", shlex.join(command), flush=True)
    start = time.perf_counter()
    executable = str(Path(sys.executable).with_name("cnnforge"))
    subprocess.run([executable, *command[1:]], check=True, stdout=subprocess.DEVNULL)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    return {
        "accuracy": evaluation["accuracy"],
        "images": evaluation["images"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(FULL_FASHION_MNIST), help="Fashion-MNIST idx folder, or 'bundled'."
    )
    parser.add_argument("--labelled", default="50,300", help="Labelled images of 5-9, per run.")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="Budget of every target model.")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_demo"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = load(args.data)

    pretrain_data = subset(raw, PRETRAIN_CLASSES, args.out / "pretrain.npz", None, 0)
    pretrain_dir = args.out / "pretrain"
    pretrained = cnnforge_run(
        pretrain_dir,
        "--data",
        str(pretrain_data),
        "--arch",
        "simple_cnn",
        "--epochs",
        str(args.pretrain_epochs),
    )
    print(f"pretrained on classes 0-4: test accuracy {pretrained['accuracy']:.2%}", flush=True)

    head_epochs = args.epochs - args.epochs // 3
    backbone = ["--backbone", f"run:{pretrain_dir}", "--fix", "dropout=0"]
    methods = {
        "scratch": ["--arch", "simple_cnn", "--epochs", str(args.epochs)],
        "transfer": [*backbone, "--epochs", str(args.epochs)],
        "transfer below flatten": [
            *backbone,
            "--fix",
            "backbone_layer=flatten",
            "--epochs",
            str(args.epochs),
        ],
        "transfer below flatten + fine-tuning": [
            *backbone,
            "--fix",
            "backbone_layer=flatten",
            "--epochs",
            str(head_epochs),
            "--fix",
            "fine_tune_layers=100",
            "--fix",
            f"fine_tune_epochs={args.epochs - head_epochs}",
        ],
    }
    results: dict[str, dict[str, list[dict]]] = {}
    for labelled in (int(n) for n in args.labelled.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"target-{labelled}-{seed}.npz"
            data = str(subset(raw, TARGET_CLASSES, args.out / name, labelled, seed))
            for method, extra in methods.items():
                run_dir = args.out / f"{labelled}-{seed}" / method.replace(" ", "_")
                row = cnnforge_run(run_dir, "--data", data, "--seed", str(seed), *extra)
                results.setdefault(str(labelled), {}).setdefault(method, []).append(
                    {"seed": seed, **row}
                )

    print(f"\nlabelled images of classes 5-9, {args.epochs} epochs each, seeds {args.seeds}")
    print("| labelled images | method | test accuracy per seed | mean |\n|---|---|---|---|")
    for labelled, by_method in results.items():
        for method, rows in by_method.items():
            accuracies = [r["accuracy"] for r in rows]
            print(
                f"| {labelled} | {method} | {', '.join(f'{a:.2%}' for a in accuracies)} | "
                f"{np.mean(accuracies):.2%} |"
            )
    summary = {"pretrained": pretrained, "epochs": args.epochs, "results": results}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
