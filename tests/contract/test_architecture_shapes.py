"""Every shape of architecture plugin, searched for real on small data, exported, and checked
for parity: the same contract whatever shape the plugin was written in."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import keras
import keras_tuner
import numpy as np
import onnx
import pytest

import cnnforge
from cnnforge.conversion.export import export
from cnnforge.core.contract import INPUT_NAME, OUTPUT_NAME
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling.hypermodel import build_model, default_space
from cnnforge.tuning.search import SearchConfig, search

PLUGINS = Path(__file__).with_name("shape_plugins.py")
RECIPE = {"learning_rate", "lr_schedule", "augment"}
GRAY = DataSpec("gray", (28, 28, 1), tuple("abcdefghij"))
# name: (form, trains with cnnforge's recipe, its own hyperparameters)
SHAPES = {
    "shape_features": ("features", True, {"filters"}),
    "shape_model_rescaling": ("model", True, {"filters"}),
    "shape_model_spec": ("model", False, {"filters", "lr"}),
    "shape_hypermodel_class": ("hypermodel", False, {"units"}),
    "shape_hypermodel_instance": ("hypermodel", True, {"units"}),
}


@pytest.fixture(scope="module", autouse=True)
def shape_plugins():
    cnnforge.load_plugins([str(PLUGINS)])


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_shape_is_told_at_registration_and_reads_its_space(name):
    form, recipe, own = SHAPES[name]
    plugin = cnnforge.get("architecture", name)
    assert plugin.info["form"] == form
    space = {hp.name for hp in default_space(plugin, GRAY)}
    assert own <= space
    assert (space >= RECIPE) is recipe  # a compiled model's own optimizer is not searched over
    model = build_model(plugin, GRAY, keras_tuner.HyperParameters())
    assert model.inputs[0].name == INPUT_NAME and model.output_names == [OUTPUT_NAME]
    keras.backend.clear_session()


# Each search takes 10-20 s here; one runs in the everyday tier, all of them in the slow one.
EVERYDAY_SEARCH = "shape_model_spec"


@pytest.mark.parametrize(
    "name",
    [n if n == EVERYDAY_SEARCH else pytest.param(n, marks=pytest.mark.slow) for n in SHAPES],
)
def test_each_shape_searches_exports_and_keeps_parity(name, small_npz, tmp_path):
    run_dir = tmp_path / "run"
    config = SearchConfig(
        data=str(small_npz), arch=name, run_dir=run_dir, max_trials=2, epochs=1, patience=0
    )
    result = search(config)
    assert all(r.status == "COMPLETED" for r in result.trials), result.trials
    exported = export(run_dir)
    assert exported.parity.passed, exported.parity.mismatches
    graph = onnx.load(exported.onnx_path).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.output] == [OUTPUT_NAME]
    assert exported.accuracy is not None and exported.accuracy.passed


def test_a_compiled_model_trains_with_its_own_optimizer(small_npz, tmp_path):
    # --batch-size is cnnforge's recipe's: a model trained with its own compile is not given it
    with pytest.warns(cnnforge.CnnforgeWarning, match="--batch-size 64 .*hp.Choice.*recipe=True"):
        result = _one_trial(small_npz, tmp_path, "shape_model_spec", batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = keras.models.load_model(result.best_model)
    assert not [w for w in caught if "optimizer" in str(w.message)]  # no stale inner optimizer
    assert type(best.optimizer).__name__ == "SGD"
    assert "lr" in result.best_trial.hyperparameters
    # its own training, as plain Keras runs it: Keras's batch of 32, not cnnforge's 128
    row = next(csv.DictReader((tmp_path / "run" / "trials.csv").open()))
    assert row["batch_size"] == "32" and row["training"] == "the model's own (batch 32)"


def test_a_compiled_models_search_is_planned_and_recorded_at_its_batch_size(small_npz, tmp_path):
    batch = "hp.Choice('batch_size', [16, 64], default=16)"  # the small data's own batch: 32
    _register(tmp_path, COMPILED_MODEL.format(name="planned", recipe="", batch=batch))
    result = _one_trial(small_npz, tmp_path, "compiled_planned")
    run = tmp_path / "run"
    assert json.loads((run / "plan.json").read_text())["batch_size"] == 16
    assert json.loads((run / "config.json").read_text())["search"]["batch_size"] == 16
    assert result.trials[0].batch_size == 16


def test_a_hypermodels_own_fit_is_called_with_one_hot_labels(small_npz, tmp_path):
    result = _one_trial(small_npz, tmp_path, "shape_hypermodel_class")
    # the batch size is declared inside its fit: it reached the trial's hyperparameters
    assert result.best_trial.hyperparameters["batch_size"] in (16, 32)


def _register(tmp_path: Path, body: str) -> str:
    path = tmp_path / f"plugin_{abs(hash(body))}.py"
    path.write_text("import keras\nfrom keras import layers\nimport cnnforge\n\n" + body)
    cnnforge.load_plugins([str(path)])
    return path.name


def _build(name: str, spec: DataSpec = GRAY) -> None:
    build_model(cnnforge.get("architecture", name), spec, keras_tuner.HyperParameters())


def test_a_compiled_model_registered_with_recipe_searches_cnnforges_recipe(tmp_path):
    _register(
        tmp_path,
        "@cnnforge.architecture('asks_recipe', pixel_range=(0, 1), recipe=True)\n"
        "def asks_recipe(hp):\n"
        "    model = keras.Sequential([layers.Flatten(), layers.Dense(10, activation='softmax')])\n"
        "    model.compile(optimizer='sgd', loss='categorical_crossentropy')\n"
        "    return model\n",
    )
    plugin = cnnforge.get("architecture", "asks_recipe")
    assert {hp.name for hp in default_space(plugin, GRAY)} >= RECIPE
    model = build_model(plugin, GRAY, keras_tuner.HyperParameters())
    assert type(model.optimizer).__name__ == "Adam"


class Steps(keras.callbacks.Callback):
    """The steps of each epoch of a fit."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.steps = self.params["steps"]


def _fit_steps(plugin_name: str, hp: keras_tuner.HyperParameters, asked: int = 128) -> tuple:
    """One epoch of ``plugin_name`` on 256 images, asked to train at batch ``asked`` (as the
    search asks): the steps it took and the batch size it recorded."""
    from cnnforge.modeling.hypermodel import PluginHyperModel

    hypermodel = PluginHyperModel(cnnforge.get("architecture", plugin_name), GRAY)
    model = hypermodel.build(hp)
    x = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1)).astype("uint8")
    y = np.arange(256) % 10
    steps = Steps()
    hypermodel.fit(hp, model, x, y, batch_size=asked, epochs=1, callbacks=[steps], verbose=0)
    keras.backend.clear_session()
    return steps.steps, hypermodel.last_fit["batch_size"], hypermodel.last_fit["training"]


COMPILED_MODEL = """
@cnnforge.architecture('compiled_{name}', pixel_range=(0, 1){recipe})
def compiled_{name}(hp):
    {batch}
    model = keras.Sequential([layers.Flatten(), layers.Dense(10, activation='softmax')])
    model.compile(optimizer='adam', loss='sparse_categorical_crossentropy')
    return model
"""


def test_a_compiled_model_trains_at_keras_batch_size_unless_it_asks_for_the_recipe(tmp_path):
    for name, recipe, batch in (
        ("own", "", "pass"),
        ("recipe", ", recipe=True", "pass"),
        ("tuned", "", "hp.Choice('batch_size', [16, 64], default=64)"),
    ):
        _register(tmp_path, COMPILED_MODEL.format(name=name, recipe=recipe, batch=batch))
    hp = keras_tuner.HyperParameters
    # Keras's default, as the user's own KerasTuner script trains it
    assert _fit_steps("compiled_own", hp()) == (8, 32, "the model's own (batch 32)")
    # recipe=True: cnnforge's recipe and batch size
    assert _fit_steps("compiled_recipe", hp()) == (math.ceil(256 / 128), 128, "cnnforge's")
    # the batch size its hyperparameters name
    tuned = hp()
    tuned.Fixed("batch_size", 16)
    assert _fit_steps("compiled_tuned", tuned) == (16, 16, "the model's own (batch 16)")


def test_a_whole_model_that_does_not_say_its_pixel_range_is_refused(tmp_path):
    _register(
        tmp_path,
        "@cnnforge.architecture('no_range')\ndef no_range(hp):\n"
        "    return keras.Sequential([layers.Flatten(), layers.Dense(10, activation='softmax')])\n",
    )
    with pytest.raises(CnnforgeError, match=r"does not say which pixels.*pixel_range=\(0, 1\)"):
        _build("no_range")


def test_a_whole_model_of_another_input_shape_is_refused(tmp_path):
    _register(
        tmp_path,
        "@cnnforge.architecture('colour_only')\ndef colour_only(hp):\n"
        "    inputs = keras.Input((32, 32, 3))\n"
        "    x = layers.Flatten()(layers.Rescaling(1 / 255)(inputs))\n"
        "    return keras.Model(inputs, layers.Dense(10, activation='softmax')(x))\n",
    )
    with pytest.raises(CnnforgeError, match=r"takes images of shape \(32, 32, 3\), but gray has"):
        _build("colour_only")


def test_a_grayscale_model_without_a_channel_axis_gets_the_images_reshaped(tmp_path):
    _register(
        tmp_path,
        "@cnnforge.architecture('mnist_style', pixel_range=(0, 1))\ndef mnist_style(hp):\n"
        "    inputs = keras.Input((28, 28))\n"
        "    x = layers.Flatten()(inputs)\n"
        "    return keras.Model(inputs, layers.Dense(10, activation='softmax')(x))\n",
    )
    plugin = cnnforge.get("architecture", "mnist_style")
    model = build_model(plugin, GRAY, keras_tuner.HyperParameters())
    assert tuple(model.inputs[0].shape) == (None, 28, 28, 1)
    images = np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 1)).astype("float32")
    assert np.asarray(model(images)).shape == (2, 10)


def test_a_whole_model_ending_in_logits_or_the_wrong_classes_is_refused(tmp_path):
    _register(
        tmp_path,
        "@cnnforge.architecture('logits', pixel_range=(0, 1))\ndef logits(hp):\n"
        "    return keras.Sequential([layers.Flatten(), layers.Dense(10)])\n\n"
        "@cnnforge.architecture('three', pixel_range=(0, 1))\ndef three(hp):\n"
        "    return keras.Sequential([layers.Flatten(), layers.Dense(3, activation='softmax')])\n",
    )
    with pytest.raises(CnnforgeError, match="not a softmax"):
        _build("logits")
    with pytest.raises(CnnforgeError, match="gray has 10 classes"):
        _build("three")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def four(hp, a, b, c):\n    pass\n", "takes 4 argument"),
        ("class NotAHyperModel:\n    pass\n", "is a type"),
        (
            "class Needs(keras_tuner.HyperModel):\n"
            "    def __init__(self, classes):\n        super().__init__()\n",
            r"Needs\(\) needs arguments; register an instance",
        ),
    ],
)
def test_a_shape_that_is_none_of_these_is_refused_at_registration(tmp_path, body, message):
    path = tmp_path / "bad_shape.py"
    path.write_text(
        f"import cnnforge\nimport keras_tuner\n\n@cnnforge.architecture('bad_shape')\n{body}"
    )
    with pytest.raises(CnnforgeError, match=message):
        cnnforge.load_plugins([str(path)])


def test_pixel_range_is_applied_before_the_model():
    plugin = cnnforge.get("architecture", "shape_model_spec")
    model = build_model(plugin, GRAY, keras_tuner.HyperParameters())
    scaled = model.get_layer("pixel_scaling")(np.array([[0.0, 127.5, 255.0]]))
    np.testing.assert_allclose(np.asarray(scaled), [[-1.0, 0.0, 1.0]], atol=1e-6)


README_HYPERMODEL = """
import keras_tuner


@cnnforge.architecture("readme_hypermodel", pixel_range=(0, 1))
class MyHyperModel(keras_tuner.HyperModel):  # the README's example, with a build and bookkeeping
    def build(self, hp):
        model = keras.Sequential(
            [layers.Flatten(), layers.Dense(hp.Int("units", 8, 16, step=8), activation="relu"),
             layers.Dense(10, activation="softmax")]
        )
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        self.built_model = model
        return model

    def fit(self, hp, model, *args, **kwargs):  # used when overridden
        # the user's model as built by this same instance (inside cnnforge's wrapper)
        MyHyperModel.fitted_what_it_built = self.built_model in model.layers
        return model.fit(*args, batch_size=hp.Choice("batch_size", [16, 32]), **kwargs)
"""


def test_the_readmes_hypermodel_searches_fitting_what_the_same_instance_built(small_npz, tmp_path):
    _register(tmp_path, README_HYPERMODEL)
    result = _one_trial(small_npz, tmp_path, "readme_hypermodel")
    assert [t.status for t in result.trials] == ["COMPLETED"], result.trials
    assert result.best_trial.hyperparameters["batch_size"] in (16, 32)
    cls = cnnforge.get("architecture", "readme_hypermodel").fn  # the registered class
    assert cls.fitted_what_it_built is True
    # its fit picked its own batch size: no throughput from the search's batch size
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "trial_0"))
    trial.Reload()
    tags = set(trial.Tags()["tensors"])
    assert "epoch/loss" in tags and "epoch/images_per_s" not in tags


def test_a_hypermodels_own_fit_on_streamed_images_is_refused(tmp_path, monkeypatch):
    import sys

    from cnnforge.data.stream import MEMORY_ENV
    from cnnforge.modeling.hypermodel import PluginHyperModel

    sys.path.insert(0, str(Path(__file__).parents[1] / "unit" / "evaluation"))
    from test_agreement import tinted_folder

    monkeypatch.setenv(MEMORY_ENV, "0")
    with pytest.warns(cnnforge.CnnforgeWarning, match="read from disk"):
        data = cnnforge.load_dataset(f"dir:{tinted_folder(tmp_path / 'photos')}")
    spec = DataSpec("photos", data.x_train.shape[1:], tuple("abcdefghij"))  # its 10 classes
    hypermodel = PluginHyperModel(cnnforge.get("architecture", "shape_hypermodel_class"), spec)
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    with pytest.raises(CnnforgeError, match="own fit.*streamed from disk.*CNNFORGE_DATA_MEMORY_MB"):
        hypermodel.fit(hp, model, data.x_train, data.y_train)


def _one_trial(small_npz, tmp_path, arch: str, **options):
    """A one-trial, one-epoch search of ``arch`` on the small data, not retrained."""
    config = SearchConfig(
        data=str(small_npz),
        arch=arch,
        run_dir=tmp_path / "run",
        max_trials=1,
        epochs=1,
        patience=0,
        retrain=False,
        **options,
    )
    return search(config)
