"""Architecture plugins in every shape cnnforge takes, loaded with ``load_plugins([this file])``
by the contract tests: one of each, small enough to search in seconds."""

import keras
import keras_tuner
from keras import layers

import cnnforge


@cnnforge.architecture("shape_features")
def shape_features(hp, inputs, spec):
    """Features: cnnforge's input and softmax around them."""
    x = layers.Conv2D(hp.Choice("filters", [4, 8], default=4), 3, activation="relu")(inputs)
    return layers.GlobalAveragePooling2D()(x)


@cnnforge.architecture("shape_model_rescaling")
def shape_model_rescaling(hp):
    """A whole, uncompiled functional model that scales raw pixels itself: cnnforge's recipe."""
    inputs = keras.Input((28, 28, 1))
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(hp.Int("filters", 4, 8, step=4), 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


@cnnforge.architecture("shape_model_spec", pixel_range=(-1, 1))
def shape_model_spec(hp, spec):
    """A whole model for the data's shape, compiled with a sparse loss, pixels in -1..1."""
    model = keras.Sequential(
        [
            keras.Input(spec.input_shape),
            layers.Conv2D(hp.Choice("filters", [4, 8]), 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(spec.num_classes),
            layers.Softmax(),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(hp.Float("lr", 1e-3, 1e-1, sampling="log", default=0.05)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class ShapeHyperModel(keras_tuner.HyperModel):
    """A KerasTuner HyperModel subclass with its own fit (it tunes the batch size)."""

    def build(self, hp):
        model = keras.Sequential(
            [
                layers.Flatten(),
                layers.Dense(hp.Int("units", 16, 32, step=16), activation="relu"),
                layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        return model

    def fit(self, hp, model, *args, **kwargs):
        self.fits = getattr(self, "fits", 0) + 1
        return model.fit(*args, **{**kwargs, "batch_size": hp.Choice("batch_size", [16, 32])})


cnnforge.architecture("shape_hypermodel_class", pixel_range=(0, 1))(ShapeHyperModel)


class ShapeInstanceHyperModel(keras_tuner.HyperModel):
    """A HyperModel with constructor arguments, registered as an instance."""

    def __init__(self, classes):
        super().__init__(name="shape_hypermodel_instance")
        self.classes = classes

    def build(self, hp):
        inputs = keras.Input((28, 28, 1))
        x = layers.Normalization(mean=127.5, variance=127.5**2)(inputs)
        x = layers.Flatten()(x)
        x = layers.Dense(hp.Choice("units", [8, 16]), activation="relu")(x)
        return keras.Model(inputs, layers.Dense(self.classes, activation="softmax")(x))


cnnforge.architecture()(ShapeInstanceHyperModel(10))
