"""A single-file cnnforge plugin: load it with `--plugin examples/single_file_plugin.py`
or `CNNFORGE_PLUGINS=examples/single_file_plugin.py`.

    cnnforge --plugin examples/single_file_plugin.py plugins show tiny_cnn
    cnnforge --plugin examples/single_file_plugin.py search --arch tiny_cnn --max-trials 3 --epochs 2
"""

from __future__ import annotations

import cnnforge


@cnnforge.architecture("tiny_cnn")
def tiny_cnn(hp, inputs, spec):
    """Two convolutions and global average pooling: the smallest model worth searching."""
    from keras import layers

    filters = hp.Choice("filters", [8, 16, 32], default=16)
    pooling = hp.Choice("pooling", ["max", "average"], default="max")
    pool = layers.MaxPooling2D if pooling == "max" else layers.AveragePooling2D
    x = layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = pool(2)(x)
    x = layers.Conv2D(filters * 2, 3, padding="same", activation="relu")(x)
    return layers.GlobalAveragePooling2D()(x)
