"""The names every stage agrees on: the exported model's input and output, its metadata keys,
input layouts, onnxruntime providers, tuners, plugin kinds and precisions.

One small module with no imports of its own, so that every stage (and the CLI's choices) can
read it without pulling in another stage.
"""

from __future__ import annotations

# The exported model: raw 0-255 pixels in, a softmax over the classes out.
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# The exported graph's second output where calibrated: higher, more like the training images.
OOD_OUTPUT_NAME = "ood_score"
# Prefix of cnnforge's own ONNX metadata keys (``cnnforge.class_names``, ...).
META_PREFIX = "cnnforge."
LAYOUTS = ("NHWC", "NCHW")

# onnxruntime's execution providers, by the short names the CLI takes.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

PLUGIN_KINDS = ("architecture", "backbone", "dataset")
# The entry-point group that both the built-in and third-party plugins register through.
PLUGIN_ENTRY_POINT_GROUP = "cnnforge.plugins"

TUNERS = ("auto", "random", "bayesian", "grid", "hyperband")
# How a search trains: mixed float16 on a GPU and float32 on a CPU ("auto"), or as named.
TRAINING_PRECISIONS = ("auto", "float32", "mixed")
# What an export's weights are stored as.
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
