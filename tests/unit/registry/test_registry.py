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


def test_a_named_plugin_file_with_a_syntax_error_is_an_error_with_file_and_line(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import cnnforge\n\ndef oops(:\n    pass\n")
    with pytest.raises(CnnforgeError) as caught:
        cnnforge.load_plugins([str(broken)])
    message = str(caught.value)
    assert message.startswith(f"plugin file {broken} (from --plugin) failed to import: SyntaxError")
    assert "line 3" in message
    with pytest.raises(CnnforgeError, match="SyntaxError"):  # asked again: still an error
        cnnforge.load_plugins([str(broken)])


def test_a_named_plugin_file_that_raises_names_its_own_line(tmp_path):
    broken = tmp_path / "raising_plugin.py"
    broken.write_text("import cnnforge\n\n\nSIZES = {}\nDEFAULT = SIZES['small']\n")
    with pytest.raises(CnnforgeError) as caught:
        cnnforge.load_plugins([str(broken)])
    assert f"KeyError: 'small' ({broken}, line 5)" in str(caught.value)


def test_a_named_module_that_fails_names_its_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "failing_module_plugin.py").write_text("import cnnforge\nimport no_such_module_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CnnforgeError) as caught:
        cnnforge.load_plugins(["failing_module_plugin"])
    message = str(caught.value)
    assert message.startswith("plugin module failing_module_plugin (from --plugin) failed")
    assert "ModuleNotFoundError" in message and "failing_module_plugin.py, line 2" in message


def test_a_named_plugin_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(CnnforgeError, match="nowhere.py .from --plugin. does not exist"):
        cnnforge.load_plugins([str(tmp_path / "nowhere.py")])


def test_a_broken_installed_plugin_is_skipped_with_its_cause_recorded():
    # What discovery does with an entry point whose module fails: record, go on.
    registry._import_as("dist:broken", "dist", lambda: 1 / 0)
    assert registry.load_errors()["dist:broken"].startswith("ZeroDivisionError")
    assert cnnforge.get("architecture", "simple_cnn").source == "cnnforge"


def test_name_clash_between_sources_is_an_error_for_a_named_file(tmp_path):
    clash = tmp_path / "clash_plugin.py"
    clash.write_text(
        "import cnnforge\n\n@cnnforge.architecture('simple_cnn')\ndef build(hp, x, spec):\n    return x\n"
    )
    with pytest.raises(CnnforgeError, match="clashes with the one from cnnforge"):
        cnnforge.load_plugins([str(clash)])
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


@pytest.mark.parametrize("option", [{"pixel_range": (0, 1)}, {"recipe": True}])
def test_whole_model_options_on_a_features_plugin_are_refused(option):
    def body(hp, inputs, spec):
        return inputs

    with pytest.raises(CnnforgeError, match=f"{next(iter(option))}= is for a whole model"):
        cnnforge.architecture("features_with_whole_model_option", **option)(body)
    assert "features_with_whole_model_option" not in {p.name for p in cnnforge.list_plugins()}
