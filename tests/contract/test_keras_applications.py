"""Every ``keras.applications`` family exports through ``to_onnx`` and matches Keras.

One smallest member per family, random weights, its smallest input (32×32 unless the family
needs more), BatchNormalization statistics set from a batch (a training-mode call with the
momentum at zero, so that the moving statistics are the batch's and the activations stay in a
realistic range instead of the exploding ones of unit variances), then the export is checked
against Keras with cnnforge's own parity code. This is what ``cnnforge export`` does with a
user's ``.keras`` file built from these applications.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import keras
import numpy as np
import pytest

from cnnforge.conversion.export import to_onnx
from cnnforge.conversion.parity import check_parity

# family: (application, input side, takes raw 0-255 pixels: preprocessing inside)
FAMILIES = {
    "convnext": ("ConvNeXtTiny", 32, True),
    "densenet": ("DenseNet121", 32, False),
    "efficientnet": ("EfficientNetB0", 32, True),
    "efficientnet_v2": ("EfficientNetV2B0", 32, True),
    "inception_resnet_v2": ("InceptionResNetV2", 75, False),
    "inception_v3": ("InceptionV3", 75, False),
    "mobilenet": ("MobileNet", 32, False),
    "mobilenet_v2": ("MobileNetV2", 32, False),
    "mobilenet_v3": ("MobileNetV3Small", 32, True),
    "nasnet": ("NASNetMobile", 32, False),
    "resnet": ("ResNet50", 32, False),
    "resnet_v2": ("ResNet50V2", 32, False),
    "vgg": ("VGG16", 32, False),
    "xception": ("Xception", 71, False),
}
CLASSES = 10
ATOL = 1e-4  # what `cnnforge export` checks float32 models with
# InceptionV3 differs from Keras by up to 1.3e-4 in a probability (top-1 agreement 100%) at these
# random weights: float32 sums taken in another order through its 94 convolutions, not a
# conversion error. Its own tolerance keeps the test meaningful; `cnnforge export --atol`
# is the user's equivalent.
# ResNet50 likewise: parity runs Keras as one graph (as `predict` does, to bound memory), whose
# fused kernels give probabilities 5.3e-5 from the same model called eagerly; onnxruntime lands
# 1.4e-4 from the graph (top-1 agreement 100%) at these random weights.
FAMILY_ATOL = {"inception_v3": 3e-4, "resnet": 3e-4}


def test_every_family_of_keras_applications_is_listed():
    modules = {
        name
        for name in dir(keras.applications)
        if not name.startswith("_") and name.islower() and name != "imagenet_utils"
    }
    aliases = {"resnet50": "resnet", "vgg16": "vgg", "vgg19": "vgg"}
    assert {aliases.get(m, m) for m in modules} == set(FAMILIES)


def _set_batchnorm_statistics(model: keras.Model, images: np.ndarray) -> None:
    layers = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def check_family(family: str) -> None:
    """Build ``family``'s smallest member, export it and check it against Keras."""
    application, side, raw_pixels = FAMILIES[family]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(side, side, 3), classes=CLASSES
    )
    rng = np.random.default_rng(0)
    low, high = (0.0, 255.0) if raw_pixels else (-1.0, 1.0)
    images = rng.uniform(low, high, (16, side, side, 3)).astype("float32")
    _set_batchnorm_statistics(model, images)
    proto = to_onnx(model)
    report = check_parity(
        model,
        proto.SerializeToString(),
        images[:8],
        inputs="random pixels",
        atol=FAMILY_ATOL.get(family, ATOL),
        min_top1_agreement=1.0,
        batch_sizes=(1, 8),
        batch_one_images=2,
    )
    assert report.passed, report.mismatches


# The light families share an interpreter (TensorFlow, Keras and tf2onnx imported once for the
# five, not five times: 88 s -> 50 s, 2.4 -> 2.5 GiB at the peak). The others keep one each: what
# their conversions keep adds up (five of them in one process peaked at 9.4 GiB; four others
# passed 9.9 GiB in the second), and all fourteen in one process ran 24 GiB out of memory.
LIGHT = ("mobilenet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "efficientnet_v2")
GROUPS = {"light": LIGHT, **{family: (family,) for family in FAMILIES if family not in LIGHT}}
FAILED = "FAILED "


def test_every_family_is_in_one_group():
    grouped = [family for families in GROUPS.values() for family in families]
    assert sorted(grouped) == sorted(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(GROUPS))
def test_application_exports_with_parity(group):
    done = subprocess.run(
        [sys.executable, __file__, *GROUPS[group]], capture_output=True, text=True, timeout=600
    )
    failed = [line for line in done.stdout.splitlines() if line.startswith(FAILED)]
    assert done.returncode == 0 and not failed, (
        "\n".join(failed) or done.stdout[-3000:] + done.stderr[-3000:]
    )


def check_families(families: list[str]) -> int:
    """Check each family in turn; a failure is one line naming it, and the rest still run."""
    failures = 0
    for family in families:
        print(f"checking {family}", flush=True)  # the last one named if the interpreter dies
        try:
            check_family(family)
        except Exception as exc:  # each family's failure is reported by name; the rest still run
            failures += 1
            print(f"{FAILED}{family}: {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        keras.backend.clear_session()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
        print(f"after {family}: peak memory {peak:.1f} GiB", flush=True)  # to regroup by
    return failures


if __name__ == "__main__":
    sys.exit(1 if check_families(sys.argv[1:]) else 0)
