"""The plugin registry: decorators, discovery through entry points and files, listing, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cnnforge
from cnnforge import registry
from cnnforge.core.errors import CnnforgeError

ROOT = Path(__file__).resolve().parents[3]


def test_builtins_are_loaded_through_the_entry_point_group():
    names = {p.name: p for p in cnnforge.list_plugins()}
    for name in (
        "simple_cnn",
        "resnet",
        "fashion_mnist_small",
        "fashion_mnist",
        "cifar10",
        "dir",
        "npz",
    ):
        assert names[name].source == "cnnforge"
        # the built-ins are a package of their own, outside the core, found like anyone's
        assert names[name].fn.__module__.startswith("cnnforge_plugins.")
    assert names["simple_cnn"].kind == "architecture"
    assert names["fashion_mnist"].kind == "dataset"


def test_example_package_is_discovered_through_its_installed_entry_point():
    plugin = cnnforge.get("architecture", "depthwise_cnn")
    assert plugin.source == "cnnforge-example-plugin"
    assert plugin.description.startswith("MobileNet-style")
    assert cnnforge.get("dataset", "stripes").source == "cnnforge-example-plugin"


def test_glob_listing_filters_by_pattern_and_kind():
    assert [p.name for p in cnnforge.list_plugins("fashion*")] == [
        "fashion_mnist",
        "fashion_mnist_small",
    ]
    kinds = {p.kind for p in cnnforge.list_plugins(kind="dataset")}
    assert kinds == {"dataset"}


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        CnnforgeError, match=r"unknown architecture plugin 'simpel_cnn'; did you mean simple_cnn"
    ):
        cnnforge.get("architecture", "simpel_cnn")


def test_register_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown plugin kind"):
        registry.register("optimizer", "adam")


def test_single_file_plugin_loads_from_a_path():
    cnnforge.load_plugins([str(ROOT / "examples" / "single_file_plugin.py")])
    plugin = cnnforge.get("architecture", "tiny_cnn")
    assert plugin.source.endswith("single_file_plugin.py")


def test_broken_plugin_is_reported_by_name_and_the_others_still_load(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import cnnforge\n\ndef oops(:\n    pass\n")
    good = tmp_path / "good_plugin.py"
    good.write_text(
        "import cnnforge\n\n@cnnforge.dataset('good_after_broken')\ndef load(path):\n"
        "    '''A dataset that loads.'''\n"
    )
    cnnforge.load_plugins([str(broken), str(good)])
    errors = registry.load_errors()
    assert str(broken) in errors
    assert errors[str(broken)].startswith("SyntaxError")
    assert "line 3" in errors[str(broken)]
    assert cnnforge.get("dataset", "good_after_broken").description == "A dataset that loads."


def test_name_clash_between_sources_is_reported(tmp_path):
    clash = tmp_path / "clash_plugin.py"
    clash.write_text(
        "import cnnforge\n\n@cnnforge.architecture('simple_cnn')\ndef build(hp, x, spec):\n    return x\n"
    )
    cnnforge.load_plugins([str(clash)])
    assert "clashes with the one from cnnforge" in registry.load_errors()[str(clash)]
    assert cnnforge.get("architecture", "simple_cnn").source == "cnnforge"


def test_plugins_from_the_environment_variable_are_loaded_in_a_fresh_process(tmp_path):
    plugin = tmp_path / "env_plugin.py"
    plugin.write_text(
        "import cnnforge\n\n@cnnforge.dataset('from_env')\ndef load(path):\n    '''From env.'''\n"
    )
    env = {**os.environ, "CNNFORGE_PLUGINS": str(plugin)}
    out = subprocess.run(
        [sys.executable, "-m", "cnnforge.cli", "plugins", "list", "from_*"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "from_env" in out.stdout
