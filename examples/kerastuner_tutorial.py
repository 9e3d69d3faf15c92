"""The KerasTuner "Getting started" tutorial's ``build_model(hp)``, used as written.

https://keras.io/guides/keras_tuner/getting_started/ (Define the search space). Only the
decorator line is added: the tutorial feeds the model pixels scaled to 0-1, so cnnforge is told
``pixel_range=(0, 1)`` and scales raw 0-255 pixels to that before the model. The model is
compiled, so each trial trains with its own Adam and loss at Keras's default batch of 32, as
the tutorial's ``tuner.search`` does; its hyperparameters (``num_layers``, ``units_*``,
``activation``, ``dropout``, ``lr``) are the search space.

    cnnforge --plugin examples/kerastuner_tutorial.py run --arch build_model --max-trials 3

The tutorial's last layer is ``Dense(10, ...)``: it fits ten-class data (Fashion-MNIST, MNIST,
CIFAR-10); take ``build_model(hp, spec)`` and ``spec.num_classes`` for other data.
"""

import keras
from keras import layers

import cnnforge


@cnnforge.architecture("build_model", pixel_range=(0, 1))
def build_model(hp):
    model = keras.Sequential()
    model.add(layers.Flatten())
    # Tune the number of layers.
    for i in range(hp.Int("num_layers", 1, 3)):
        model.add(
            layers.Dense(
                # Tune number of units separately.
                units=hp.Int(f"units_{i}", min_value=32, max_value=512, step=32),
                activation=hp.Choice("activation", ["relu", "tanh"]),
            )
        )
    if hp.Boolean("dropout"):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
