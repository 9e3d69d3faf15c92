"""``cnnforge plugins list`` and ``cnnforge plugins show``. Listing imports no TensorFlow."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
from rich.table import Table

from cnnforge import registry
from cnnforge.cli.output import console, err_console, quiet_tensorflow
from cnnforge.core.contract import PLUGIN_KINDS


@click.group("plugins")
def plugins_group() -> None:
    """List and inspect architecture, backbone and dataset plugins."""


@plugins_group.command("list")
@click.argument("pattern", default="*")
@click.option("--kind", type=click.Choice(PLUGIN_KINDS), help="Only plugins of this kind.")
def plugins_list(pattern: str, kind: str | None) -> None:
    """List plugins whose name matches the glob PATTERN."""
    table = Table("name", "kind", "source", "description", box=None, pad_edge=False)
    for plugin in registry.list_plugins(pattern, kind):
        table.add_row(plugin.name, plugin.kind, plugin.source, plugin.description)
    console.print(table)
    for source, cause in registry.load_errors().items():
        err_console.print(f"[yellow]warning:[/] plugin {source} failed to load: {cause}")


@plugins_group.command("show")
@click.argument("name")
@click.option(
    "--data",
    default="fashion_mnist_small",
    show_default=True,
    help="Dataset whose input shape the space is built for.",
)
def plugins_show(name: str, data: str) -> None:
    """Print a plugin's search space: names, types, ranges or choices, defaults."""
    plugin = registry.find(name)
    console.print(
        f"[bold]{plugin.name}[/] ({plugin.kind}, from {plugin.source}): {plugin.description}"
    )
    if plugin.kind == "dataset":
        return
    if plugin.kind == "architecture":
        console.print(_architecture_shape(plugin))
    if plugin.kind == "backbone":
        sizes = ", ".join(f"{k} {v}" for k, v in plugin.info.items() if k.endswith("size"))
        console.print(
            f"{sizes}; weights: imagenet (default; its space is shown), none (image_size then "
            "starts at the data's size), or a weights file"
        )
        plugin = dataclasses.replace(plugin, info={**plugin.info, "weights": "imagenet"})
    quiet_tensorflow()
    from cnnforge.data.dataset import load_dataset
    from cnnforge.modeling.hypermodel import default_build

    built = default_build(plugin, load_dataset(data).spec)
    console.print(f"training recipe: {built.training}")
    table = Table("hyperparameter", "type", "range or choices", "default", box=None, pad_edge=False)
    for hp in built.space:
        table.add_row(hp.name, type(hp).__name__, _describe_range(hp), repr(hp.default))
    console.print(table)


def _architecture_shape(plugin: registry.Plugin) -> str:
    """Which shape the architecture was written in, and what cnnforge adds around it."""
    form = plugin.info.get("form", registry.FEATURES)
    if form == registry.FEATURES:
        return "build(hp, inputs, spec) -> features: cnnforge's input, softmax and training recipe"
    what = "build(hp, spec)" if plugin.info.get("takes_spec") else "build(hp)"
    what = "keras_tuner.HyperModel" if form == registry.HYPERMODEL else f"{what} -> keras.Model"
    low, high = plugin.info.get("pixel_range", (0, 255))
    pixels = (
        f"pixels scaled to {low:g}..{high:g}"
        if "pixel_range" in plugin.info
        else "raw 0..255 pixels (a Rescaling/Normalization first layer)"
    )
    training = (
        "cnnforge's training recipe"
        if plugin.info.get("recipe")
        else "its own optimizer, loss and batch size (Keras's 32, or its hp 'batch_size') if "
        "compiled, else cnnforge's training recipe"
    )
    fit = ""
    if form == registry.HYPERMODEL:
        from cnnforge.modeling.whole import overrides_fit

        fit = "; its own fit (hyperparameters declared there appear in its trials only)" * (
            overrides_fit(plugin)
        )
    return f"{what}: {pixels}; trains with {training}{fit}"


def _describe_range(hp: Any) -> str:
    """A keras_tuner hyperparameter's values in a few words."""
    kind = type(hp).__name__
    if kind == "Choice":
        return ", ".join(map(str, hp.values))
    if kind in ("Int", "Float"):
        step = f" step {hp.step:g}" if getattr(hp, "step", None) else ""
        return f"{hp.min_value:g} .. {hp.max_value:g}{step} ({hp.sampling or 'linear'})"
    if kind == "Boolean":
        return "True, False"
    return repr(getattr(hp, "value", ""))
