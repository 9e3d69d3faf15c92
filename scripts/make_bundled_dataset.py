"""Build plugins/cnnforge_plugins/_data/fashion_mnist_small.npz from the real Fashion-MNIST files.

The bundled dataset is a stratified, seeded subset of Fashion-MNIST (Zalando SE, MIT licence;
see plugins/cnnforge_plugins/_data/LICENSE-fashion-mnist.txt). Debian's package ``dataset-fashion-mnist``
installs the idx files in /usr/share/datasets/fashion-mnist:

    python scripts/make_bundled_dataset.py [--source DIR] [--train-per-class 800] [--test-per-class 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from cnnforge_plugins.datasets import FASHION_MNIST_CLASSES

from cnnforge.data.readers import read_idx_folder

OUTPUT = (
    Path(__file__).resolve().parent.parent
    / "plugins"
    / "cnnforge_plugins"
    / "_data"
    / "fashion_mnist_small.npz"
)


def stratified_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class, in shuffled order."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)
    ]
    return rng.permutation(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-per-class", type=int, default=800)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20261127)
    args = parser.parse_args()

    (x_train, y_train), (x_test, y_test) = read_idx_folder(Path(args.source))
    rng = np.random.default_rng(args.seed)
    train = stratified_subset(y_train, args.train_per_class, rng)
    test = stratified_subset(y_test, args.test_per_class, rng)
    tmp = OUTPUT.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        x_train=x_train[train],
        y_train=y_train[train],
        x_test=x_test[test],
        y_test=y_test[test],
        class_names=np.array(FASHION_MNIST_CLASSES),
    )
    tmp.replace(OUTPUT)
    print(
        f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB): {len(train)} train, {len(test)} test"
    )


if __name__ == "__main__":
    main()
