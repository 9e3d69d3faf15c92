"""Example third-party cnnforge plugins: an architecture and a dataset."""

from __future__ import annotations

import numpy as np

import cnnforge


@cnnforge.architecture("depthwise_cnn")
def depthwise_cnn(hp, inputs, spec):
    """MobileNet-style depthwise-separable convolutions with searchable depth and width."""
    from keras import layers

    blocks = hp.Int("blocks", 1, 4, default=2)
    width = hp.Choice("width", [8, 16, 32], default=16)
    dropout = hp.Float("dropout", 0.0, 0.5, step=0.25, default=0.0)

    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for i in range(blocks):
        stride = 2 if min(x.shape[1:3]) >= 4 else 1
        x = layers.SeparableConv2D(width * 2 ** (i + 1), 3, strides=stride, padding="same")(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(dropout)(x) if dropout else x


@cnnforge.dataset("stripes")
def stripes(path: str | None) -> cnnforge.RawData:
    """Synthetic 16x16 grayscale stripes, horizontal vs vertical (no download needed)."""
    rng = np.random.default_rng(0 if path is None else int(path))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        phase = rng.integers(0, 4, n)
        grid = np.arange(16)
        images = np.empty((n, 16, 16), np.uint8)
        for i, (label, p) in enumerate(zip(labels, phase, strict=True)):
            bars = ((grid + p) // 2) % 2 * 200
            images[i] = bars[:, None] if label == 0 else bars[None, :]
        noise = rng.integers(0, 56, images.shape, dtype=np.uint8)
        return images + noise, labels

    x_train, y_train = make(400)
    x_test, y_test = make(100)
    return cnnforge.RawData(x_train, y_train, x_test, y_test, ("horizontal", "vertical"))
