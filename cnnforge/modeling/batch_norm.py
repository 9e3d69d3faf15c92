"""Keras' ``BatchNormalization`` trained through TensorFlow's fused kernel.

Keras 3 normalises a batch on TensorFlow with two reductions and a dozen element-wise ops
forward and as many backward. TensorFlow's pip build runs those in Eigen kernels compiled for
SSE ("rebuild TensorFlow with the appropriate compiler flags", it says at start-up), while
``FusedBatchNormV3`` is one oneDNN kernel each way, generated for the CPU it runs on (AVX-512
where there is one). On the 30-minute Fashion-MNIST run's winner (three convolution blocks with
batch normalization; 2-core AMD EPYC) that made the trainer 1.21-1.69x faster in three
alternated pairs of ``benchmarks/trainer_throughput.py`` with and without ``--keras-batch-norm``.

The layer stays Keras' own: ``fuse`` routes a layer instance's ``call``, and only a training
call the fused kernel computes exactly as Keras does (4-D channels-last float32 inputs, no
mask, a trainable layer) takes the kernel; any other call, inference included, runs Keras'
code. A saved model is plain Keras, and the exported graph does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

# cuDNN's least epsilon: a layer with a smaller one stays on Keras' code on every device.
LEAST_EPSILON = 1.001e-5
_ROUTED = "_cnnforge_fused_call"


def fuse(model: keras.Model) -> int:
    """Route the training calls of ``model``'s ``BatchNormalization`` layers (nested models'
    included) through the fused kernel where it computes what Keras computes; how many."""
    routed = 0
    for layer in model._flatten_layers(include_self=False):
        if not _fusable(layer):
            continue
        if not hasattr(layer, _ROUTED):
            object.__setattr__(layer, _ROUTED, True)
            object.__setattr__(layer, "call", _fused_call(layer, layer.call))
        routed += 1
    return routed


def _fusable(layer: keras.layers.Layer) -> bool:
    """Keras' own layer (a subclass may compute something else) in its plain form."""
    return (
        type(layer) is keras.layers.BatchNormalization
        and not getattr(layer, "synchronized", False)
        and not getattr(layer, "renorm", False)
        and layer.epsilon >= LEAST_EPSILON
    )


def _fused_call(layer: keras.layers.BatchNormalization, keras_call: Callable) -> Callable:
    def call(inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if training and layer.trainable and mask is None and _fits_the_kernel(layer, inputs):
            return _normalised_batch(layer, inputs)
        return keras_call(inputs, training=training, mask=mask)

    return call


def _fits_the_kernel(layer: keras.layers.BatchNormalization, inputs: Any) -> bool:
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # what op_determinism sets

    rank = len(inputs.shape)
    if rank != 4 or layer.axis not in (-1, rank - 1) or inputs.dtype != tf.float32:
        return False
    # TensorFlow promises no deterministic fused gradient on a GPU (it raises for the kernel's
    # inference mode and says nothing of its training mode): Keras' code there, under determinism
    deterministic = tf_config.is_op_determinism_enabled()
    return not (deterministic and tf.config.list_logical_devices("GPU"))


def _normalised_batch(layer: keras.layers.BatchNormalization, inputs: Any) -> Any:
    """The batch normalised by its own statistics, the moving ones updated as Keras does."""
    import tensorflow as tf

    channels = inputs.shape[-1]
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs,
        scale=layer.gamma if layer.scale else tf.ones([channels]),
        offset=layer.beta if layer.center else tf.zeros([channels]),
        mean=tf.zeros([channels]),
        variance=tf.ones([channels]),
        epsilon=layer.epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
    )
    # the kernel returns the sample variance, n / (n - 1) times the one Keras keeps
    count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
    variance = variance * (count - 1.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
    return outputs
