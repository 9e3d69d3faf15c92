"""ImageNet backbones from ``keras.applications``, each with its own preprocessing inside.

Every backbone takes RGB pixels in 0–255: the application's own ``preprocess_input`` (scaling,
channel order, mean and deviation) is part of the model, so the exported ONNX takes raw pixels
too. MobileNetV3, EfficientNet and ConvNeXt carry it inside the application already.
``weights`` is "imagenet" (keras downloads it once into ``$KERAS_HOME/models``), None, or a
weights file saved from the same application without its classifier.
"""

from __future__ import annotations

from cnnforge import backbone


def keras_application(
    application: str, module: str, input_shape: tuple, weights: str | None, **options
):
    """``keras.applications.<application>`` without its classifier, behind its preprocessing.

    The preprocessing is built on the input tensor and the application on top of it, so the
    result is one flat model whose layers are the application's (weights files load by layer).
    """
    import keras
    from keras import applications

    pixels = keras.Input(input_shape, name="pixels")
    preprocessed = getattr(applications, module).preprocess_input(pixels)
    return getattr(applications, application)(
        include_top=False, weights=weights, input_tensor=preprocessed, **options
    )


@backbone("mobilenet_v2", native_size=224, min_size=32)
def mobilenet_v2(input_shape, weights):
    """MobileNetV2 (2018), 2.3M parameters without its classifier; inverted residuals."""
    import warnings

    # Unknown height and width: keras then picks its 224 weights for every image size (and says
    # so), the one file that --weights imagenet checks and --weights PATH is asked for.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`input_shape` is undefined or non-square")
        return keras_application(
            "MobileNetV2", "mobilenet_v2", (None, None, input_shape[-1]), weights
        )


@backbone("mobilenet_v3_small", native_size=224, min_size=32)
def mobilenet_v3_small(input_shape, weights):
    """MobileNetV3-Small (2019), 0.9M parameters without its classifier; for phones."""
    return keras_application("MobileNetV3Small", "mobilenet_v3", input_shape, weights)


@backbone("mobilenet_v3_large", native_size=224, min_size=32)
def mobilenet_v3_large(input_shape, weights):
    """MobileNetV3-Large (2019), 3.0M parameters without its classifier."""
    return keras_application("MobileNetV3Large", "mobilenet_v3", input_shape, weights)


@backbone("efficientnet_b0", native_size=224, min_size=32)
def efficientnet_b0(input_shape, weights):
    """EfficientNet-B0 (2019), 4.0M parameters without its classifier."""
    return keras_application("EfficientNetB0", "efficientnet", input_shape, weights)


@backbone("efficientnet_b1", native_size=240, min_size=32)
def efficientnet_b1(input_shape, weights):
    """EfficientNet-B1 (2019), 6.6M parameters without its classifier."""
    return keras_application("EfficientNetB1", "efficientnet", input_shape, weights)


@backbone("efficientnet_b2", native_size=260, min_size=32)
def efficientnet_b2(input_shape, weights):
    """EfficientNet-B2 (2019), 7.8M parameters without its classifier."""
    return keras_application("EfficientNetB2", "efficientnet", input_shape, weights)


@backbone("resnet50", native_size=224, min_size=32)
def resnet50(input_shape, weights):
    """ResNet-50 (2015), 23.6M parameters without its classifier; caffe-style BGR input."""
    return keras_application("ResNet50", "resnet50", input_shape, weights)


@backbone("densenet121", native_size=224, min_size=32)
def densenet121(input_shape, weights):
    """DenseNet-121 (2017), 7.0M parameters without its classifier."""
    return keras_application("DenseNet121", "densenet", input_shape, weights)


@backbone("convnext_tiny", native_size=224, min_size=32)
def convnext_tiny(input_shape, weights):
    """ConvNeXt-Tiny (2022), 27.8M parameters without its classifier; exact GELU."""
    from cnnforge import grouped_to_depthwise

    # cnnforge's export rewrites them anyway; rewritten here, training runs without XLA on CPU too
    return grouped_to_depthwise(keras_application("ConvNeXtTiny", "convnext", input_shape, weights))
