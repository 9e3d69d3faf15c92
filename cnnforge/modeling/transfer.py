"""Backbone plugins → the transfer part of the HyperModel, and its two-stage training.

A backbone plugin is ``build(input_shape, weights) -> keras.Model``: a feature extractor that
takes pixels in 0–255 (RGB unless it declares ``channels``) and returns a feature map
``(batch, h, w, c)`` or features ``(batch, n)``; its own preprocessing lives inside it.
``weights`` is ``"imagenet"``, ``None`` (random initialisation) or the path of a local weights
file. It is registered with ``@cnnforge.backbone(name, native_size=..., min_size=...)``, and
optionally ``sizes=(...)`` (the only sizes it takes) and ``channels=`` (default 3).

The model cnnforge builds around it: raw pixels → resize to ``image_size`` (searched among the
sizes the backbone takes) → grayscale to RGB where needed → the backbone, frozen and called with
``training=False`` → average or max pooling → a searched head of dense layers and dropout →
cnnforge's softmax. Training has two stages (``fine_tune``): the head with the backbone frozen,
then, if ``fine_tune_layers`` > 0, the top layers of the backbone too at a lower learning rate,
BatchNormalization layers kept frozen and in inference mode, as Keras recommends.

``run:PATH`` turns a cnnforge run directory or a ``.keras`` classifier into a backbone: its
layers up to the classifier, with the weights it was trained with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from cnnforge import registry
from cnnforge.core.contract import OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling import training
from cnnforge.registry import Plugin

BACKBONE_LAYER = "backbone"
RUN_PREFIX = "run:"
IMAGENET = "imagenet"
MAX_DENSE = 2
FINE_TUNE_LAYERS = (0, 10, 20, 50, 100)
DOWNLOAD_TIMEOUT_S = 60
# set in a plugin's info while it is built only to read its space: the weights are not loaded
# (no download), but the space is the one they give (pretrained or not)
SPACE_ONLY = "space_only"


# --- resolving a backbone and its weights ----------------------------------------------------


def parse_weights(text: str | None) -> str | None:
    """``imagenet`` (also the default), ``none`` → None, or an existing weights file path."""
    if text is None or text.lower() == IMAGENET:
        return IMAGENET
    if text.lower() == "none":
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise CnnforgeError(
            f"weights file {text} does not exist; pass --weights imagenet, none, or a weights file"
        )
    return str(path)


def resolve_backbone(
    name: str, weights: str | None = None, image_sizes: tuple[int, ...] = ()
) -> Plugin:
    """The backbone ``name`` (a registered one or ``run:PATH``) with its weights bound and checked.

    The backbone is built once here with the requested weights, so a missing download, a
    weights file of another architecture, or an image size it cannot take is a one-line error
    before anything is written. ``image_sizes`` are sizes the user pinned or listed.
    """
    if name.startswith(RUN_PREFIX):
        if weights is not None:
            raise CnnforgeError(
                f"backbone {name} brings the weights it was trained with; drop --weights"
            )
        return run_backbone(name[len(RUN_PREFIX) :])
    plugin = registry.get("backbone", name)
    for size in image_sizes:
        check_image_size(plugin, size)
    bound = dataclasses.replace(plugin, info={**plugin.info, "weights": parse_weights(weights)})
    native = plugin.info["native_size"]
    build_backbone(bound, (native, native, plugin.info.get("channels", 3)))
    keras.backend.clear_session()
    return bound


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _imagenet_problem(plugin: Plugin, exc: BaseException) -> str:
    """What failed, from where, and the two ways on (keras says ``URL fetch failure on URL: ...``)."""
    text = _first_line(exc, limit=1000)
    url = re.search(r"https?://\S+?(?=:? |$)", str(exc))
    reason = text.rsplit(" -- ", 1)[-1] if url else text
    source = f" from {url.group(0)}" if url else ""
    return (
        f"cannot get the ImageNet weights of backbone {plugin.name}{source} ({reason}); offline? "
        "fetch that file where there is internet and pass it with --weights PATH (keras keeps "
        "its downloads in $KERAS_HOME/models), or use --weights none"
    )


@contextlib.contextmanager
def _download_timeout(seconds: float) -> Iterator[None]:
    """A socket timeout while weights may download, so a silent network fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def build_backbone(
    plugin: Plugin, input_shape: tuple[int, int, int], **options: Any
) -> keras.Model:
    """Call the plugin with its bound weights; weights problems become one-line errors."""
    weights = None if plugin.info.get(SPACE_ONLY) else plugin.info.get("weights")
    try:
        with _download_timeout(DOWNLOAD_TIMEOUT_S):
            model = plugin.fn(input_shape, weights, **options)
    except CnnforgeError:
        raise
    except Exception as exc:
        if weights == IMAGENET:
            raise CnnforgeError(_imagenet_problem(plugin, exc)) from exc
        if weights is not None:
            raise CnnforgeError(
                f"weights file {weights} does not fit backbone {plugin.name} "
                f"({_first_line(exc)}); pass weights saved from this architecture without its "
                "classifier (include_top=False), or --weights none"
            ) from exc
        raise
    if not isinstance(model, keras.Model) or len(model.outputs[0].shape) not in (2, 4):
        shape = getattr(getattr(model, "outputs", [None])[0], "shape", type(model).__name__)
        raise CnnforgeError(
            f"backbone plugin {plugin.name!r} returned {shape}; it must return a keras.Model "
            "whose output is a feature map (batch, h, w, c) or features (batch, n)"
        )
    return model


# --- image size and channels ------------------------------------------------------------------


def image_sizes(plugin: Plugin) -> list[int]:
    """The sizes a search tries: the declared ones, or steps of 32 from half to native size."""
    info = plugin.info
    if "sizes" in info:
        return sorted(info["sizes"])
    native, minimum = info["native_size"], info.get("min_size", info["native_size"])
    steps = {s for s in range(32, native, 32) if s >= max(minimum, native // 2)}
    return sorted(steps | {native})


def smallest_size(plugin: Plugin) -> int:
    """The smallest image size the backbone takes."""
    info = plugin.info
    if "sizes" in info:
        return min(info["sizes"])
    return info.get("min_size", info["native_size"])


def pretrained(plugin: Plugin) -> bool:
    """Whether the backbone brings learned weights: ``run:`` ones, or any bound but none."""
    return "input_shape" in plugin.info or plugin.info.get("weights") is not None


def size_for_data(plugin: Plugin, spec: DataSpec) -> int:
    """The smallest size the backbone takes, in steps of 32, that holds the data's images
    (at most the native size): 32 for 28×28 data and every built-in backbone."""
    info, side = plugin.info, max(spec.input_shape[:2])
    if "sizes" in info:
        fitting = [size for size in sorted(info["sizes"]) if size >= side]
        return fitting[0] if fitting else max(info["sizes"])
    rounded = max(smallest_size(plugin), -(-side // 32) * 32)
    return min(rounded, info["native_size"])


def default_image_size(plugin: Plugin, spec: DataSpec) -> int:
    """Where the search starts: pretrained weights at the size they were trained at (native);
    random ones (``--weights none``) at the data's own size, since upscaling learns nothing
    there and costs the square of the factor (28×28 to 224: 64× the pixels)."""
    return plugin.info["native_size"] if pretrained(plugin) else size_for_data(plugin, spec)


def image_size_note(plugin: Plugin, spec: DataSpec) -> str | None:
    """One line saying that random weights start from the data's size (None where they do not)."""
    size = default_image_size(plugin, spec)
    if pretrained(plugin) or size == plugin.info["native_size"]:
        return None
    height, width = spec.input_shape[:2]
    return (
        f"--weights none: image_size {size} by default (the data is {height}x{width}; "
        f"{plugin.name}'s native {plugin.info['native_size']} is for its pretrained weights); "
        "--fix image_size=N or --space image_size=... to choose"
    )


def check_image_size(plugin: Plugin, size: int) -> None:
    info = plugin.info
    if "sizes" in info and size not in info["sizes"]:
        raise CnnforgeError(
            f"backbone {plugin.name} takes images of size {', '.join(map(str, info['sizes']))}, "
            f"got image_size={size}; cnnforge resizes every image to image_size inside the "
            "model, so pick one of those"
        )
    minimum = smallest_size(plugin)
    if size < minimum:
        raise CnnforgeError(
            f"backbone {plugin.name} needs images of at least {minimum}x{minimum} pixels, got "
            f"image_size={size}; cnnforge resizes every image to image_size inside the model, "
            f"so choose image_size >= {minimum} (its native size is {info['native_size']})"
        )


def _adapt_channels(plugin: Plugin, x: Any, spec: DataSpec, channels: int) -> Any:
    have = spec.input_shape[-1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return keras.layers.Concatenate(name="grayscale_to_rgb")([x, x, x])
    raise CnnforgeError(
        f"backbone {plugin.name} takes {channels}-channel images and {spec.name} has {have} "
        "channels; cnnforge only turns grayscale into RGB: convert the images first"
    )


# --- the model -------------------------------------------------------------------------------


def backbone_features(plugin: Plugin, hp: Any, inputs: Any, spec: DataSpec) -> Any:
    """Raw pixels → resize → RGB → backbone → pooling → head: the classifier's features.

    A backbone with pretrained weights is frozen (its top layers may be fine-tuned after); one
    initialised at random (``--weights none``) has learned nothing to keep, so it trains whole,
    its batch normalisation in training mode, and no second stage follows."""
    if "input_shape" in plugin.info:  # a run: backbone takes exactly its own input shape
        height, width, channels = plugin.info["input_shape"]
    else:
        default = default_image_size(plugin, spec)
        sizes = sorted({default, *image_sizes(plugin)})
        size = hp.Choice("image_size", sizes, default=default)
        check_image_size(plugin, size)
        height, width, channels = size, size, plugin.info.get("channels", 3)
    x = inputs
    if tuple(spec.input_shape[:2]) != (height, width):
        x = keras.layers.Resizing(height, width, name="resize")(x)
    x = _adapt_channels(plugin, x, spec, channels)

    options = {}
    if len(plugin.info.get("feature_layers", [])) > 1:
        layers = plugin.info["feature_layers"]
        options["output_layer"] = hp.Choice("backbone_layer", layers, default=layers[0])
    backbone = build_backbone(plugin, (height, width, channels), **options)
    wrapped = keras.Model(backbone.inputs[0], backbone.outputs[0], name=BACKBONE_LAYER)
    learned = pretrained(plugin)
    wrapped.trainable = not learned
    # a pretrained backbone's BatchNormalization stays in inference mode, even fine-tuned
    x = wrapped(x, training=False) if learned else wrapped(x)
    if len(x.shape) == 4:
        pooling = hp.Choice("pooling", ["avg", "max"], default="avg")
        pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
        x = pool[pooling](name=f"{pooling}_pool")(x)
    features = _head(hp, x)
    _declare_fine_tuning(hp)
    return features


def _declare_fine_tuning(hp: Any) -> None:
    """The second stage's knobs, declared while building so that the space shows them."""
    hp.Choice("fine_tune_layers", list(FINE_TUNE_LAYERS), default=0)
    hp.Choice("fine_tune_lr_factor", [0.1, 0.01], default=0.1)
    hp.Int("fine_tune_epochs", 1, 10, default=3)


def _head(hp: Any, x: Any) -> Any:
    dense_layers = hp.Int("dense_layers", 0, MAX_DENSE, default=0)
    units = [
        hp.Choice(f"dense_units_{i}", [64, 128, 256, 512], default=256) for i in range(MAX_DENSE)
    ]
    dropout = hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.2)
    for i in range(dense_layers):
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
        x = keras.layers.Dense(units[i], activation="relu")(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return x


def model_name(plugin: Plugin) -> str:
    """A Keras-safe model name (``run:runs/x`` has characters Keras refuses)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", plugin.name).strip("_") or "model"


# --- training: the second stage ----------------------------------------------------------------


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` with nested models expanded, inputs left out, in order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(leaf_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            found.append(layer)
    return found


def unfreeze_top(backbone: keras.Model, count: int) -> list[keras.layers.Layer]:
    """Make the top ``count`` layers trainable, BatchNormalization excepted; return them."""
    backbone.trainable = True
    layers = leaf_layers(backbone)
    top = layers[-count:] if count else []
    chosen = [layer for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.trainable = any(layer is c for c in chosen)
    return chosen


def fine_tune(
    hp: Any, model: keras.Model, history: keras.callbacks.History, *args: Any, **kwargs: Any
) -> keras.callbacks.History:
    """The second stage: unfreeze the top ``fine_tune_layers`` and train on; one merged history."""
    count = hp.get("fine_tune_layers")
    if not count or model.get_layer(BACKBONE_LAYER).trainable:  # trained whole from the start
        return history
    if not unfreeze_top(model.get_layer(BACKBONE_LAYER), count):
        return history
    recipe = training.recipe(hp)
    learning_rate = recipe.learning_rate * hp.get("fine_tune_lr_factor")
    training.compile_model(
        model, dataclasses.replace(recipe, learning_rate=learning_rate, lr_schedule="constant")
    )
    done = history.epoch[-1] + 1 if history.epoch else kwargs.get("initial_epoch", 0)
    kwargs = {**kwargs, "initial_epoch": done, "epochs": done + hp.get("fine_tune_epochs")}
    more = model.fit(*args, **kwargs)
    for name, values in more.history.items():
        history.history.setdefault(name, []).extend(values)
    history.epoch.extend(more.epoch)
    return history


# --- run: backbones ----------------------------------------------------------------------------


def _classifier(model: keras.Model, path: Path) -> keras.layers.Layer:
    """cnnforge's ``probabilities`` layer, or a final Dense."""
    names = [layer.name for layer in model.layers]
    layer = model.get_layer(OUTPUT_NAME) if OUTPUT_NAME in names else model.layers[-1]
    if not isinstance(layer, keras.layers.Dense):
        raise CnnforgeError(
            f"cannot find the classifier of {path}: expected a final Dense layer; "
            "give a cnnforge run or a Keras classifier"
        )
    return layer


def feature_layers(model: keras.Model, path: Path) -> list[str]:
    """Where the features can be taken: the layer under the classifier, then, going down
    through the dense layers above the feature maps, the layer under each (dropout skipped)."""
    below = list(reversed(model.layers[: model.layers.index(_classifier(model, path))]))
    names = []
    for layer in below:
        if isinstance(layer, keras.layers.Dropout):
            continue
        names.append(layer.name)
        if not isinstance(layer, keras.layers.Dense):
            break
    return names


def _load_classifier(keras_path: Path) -> keras.Model:
    from cnnforge.modeling.keras_io import as_functional, load_keras_model

    model = as_functional(load_keras_model(keras_path))
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise CnnforgeError(f"{keras_path} does not take one image input; it cannot be a backbone")
    return model


def feature_extractor(keras_path: Path, output_layer: str | None = None) -> keras.Model:
    """A trained classifier's layers up to ``output_layer`` (default: under the classifier)."""
    model = _load_classifier(keras_path)
    output = model.get_layer(output_layer or feature_layers(model, keras_path)[0]).output
    return keras.Model(model.inputs, output, name="features")


def run_backbone(path: str) -> Plugin:
    """A cnnforge run directory or ``.keras`` classifier as a backbone plugin.

    Its ``feature_layers`` are where the features may be taken (searched as ``backbone_layer``):
    just under the classifier by default, or lower, under dense layers the source task shaped.
    """
    from cnnforge.modeling.keras_io import resolve_source

    keras_path = resolve_source(Path(path)).keras_path
    model = _load_classifier(keras_path)
    layers = feature_layers(model, keras_path)
    height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
    keras.backend.clear_session()

    def build(
        input_shape: tuple[int, int, int], weights: str | None, output_layer: str | None = None
    ) -> keras.Model:
        return feature_extractor(keras_path, output_layer)

    return Plugin(
        name=f"{RUN_PREFIX}{path}",
        kind="backbone",
        fn=build,
        description=f"the trained layers of {keras_path} up to its classifier",
        source=str(keras_path),
        info={
            "native_size": height,
            "input_shape": (height, width, channels),
            "feature_layers": layers,
        },
    )
