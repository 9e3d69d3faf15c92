"""A small CIFAR-style ResNet (He et al. 2016, v1 basic blocks) with searchable depth and width."""

from __future__ import annotations

from cnnforge import architecture
from cnnforge_plugins import BN_MOMENTUM


def _basic_block(x, filters: int, stride: int):
    from keras import layers

    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.Activation("relu")(layers.BatchNormalization(momentum=BN_MOMENTUM)(y))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM)(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM)(shortcut)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


@architecture("resnet")
def resnet(hp, inputs, spec):
    """CIFAR-style ResNet: stages of basic blocks, width doubling per stage; default ResNet-8."""
    from keras import layers

    stages = hp.Int("stages", 2, 3, default=3)
    blocks = hp.Int("blocks_per_stage", 1, 3, default=1)
    width = hp.Choice("width", [8, 16, 32, 64], default=16)
    dropout = hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.0)

    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = layers.Activation("relu")(layers.BatchNormalization(momentum=BN_MOMENTUM)(x))
    for stage in range(stages):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 and min(x.shape[1:3]) >= 2 else 1
            x = _basic_block(x, width * 2**stage, stride)
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    return x
