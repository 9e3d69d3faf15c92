"""The seed's workflow, written with cnnforge's Python API.

The seed trains the TensorFlow CIFAR-10 tutorial CNN for 10 epochs and looks at its accuracy.
Here the same network is the first trial of a Bayesian search around it (filters, kernel,
pooling, dense sizes, dropout, batch norm, learning rate); the best model is exported to ONNX,
checked against Keras, benchmarked with onnxruntime and scored on the test split.

    python examples/cifar10_search.py                          # downloads CIFAR-10 through keras
    python examples/cifar10_search.py cifar-10-python.tar.gz   # or a local copy (tarball or folder)
"""

from __future__ import annotations

import sys
from pathlib import Path

import cnnforge


def main() -> None:
    cnnforge.load_plugins()
    data = f"cifar10:{sys.argv[1]}" if len(sys.argv) > 1 else "cifar10"
    config = cnnforge.SearchConfig(
        data=data,
        arch="simple_cnn",
        run_dir=Path("runs/cifar10"),
        tuner="bayesian",
        max_trials=20,
        epochs=10,
        batch_size=64,
    )
    result = cnnforge.run(config, stage=lambda name: print(f"== {name}"))
    print(
        f"best trial {result.search.best_trial.trial_id}: {result.search.best_trial.hyperparameters}"
    )
    print(f"test accuracy (onnxruntime): {result.evaluation.accuracy:.2%}")
    print(f"batch-1 latency: {result.bench.results[0].latency_ms['p50']:.3f} ms (p50)")
    print(f"report: {result.report}")


if __name__ == "__main__":
    main()
