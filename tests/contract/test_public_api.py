"""The public API: every name in ``cnnforge.__all__`` resolves, and none of them is shadowed by
a submodule once every submodule has been imported (``cnnforge.search`` stays the function)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import cnnforge


def _all_submodules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(cnnforge.__path__, prefix="cnnforge.")
        if not info.name.endswith("__main__")
    ]


def test_no_public_name_is_a_submodule_name():
    submodules = {name.split(".")[1] for name in _all_submodules()}
    assert not submodules & set(cnnforge.__all__)


def test_stage_functions_stay_functions_after_every_submodule_is_imported():
    stage_functions = ["search", "export", "evaluate", "explain", "benchmark", "run", "classify"]
    before = {name: getattr(cnnforge, name) for name in stage_functions}
    for name in _all_submodules():
        importlib.import_module(name)
    for name in stage_functions:
        value = getattr(cnnforge, name)
        assert callable(value) and not isinstance(value, type(cnnforge)), name
        assert value is before[name]
    for name in cnnforge.__all__:
        assert getattr(cnnforge, name) is not None


def test_importing_the_plugin_api_loads_no_tensorflow():
    code = (
        "import sys, cnnforge\n"
        "cnnforge.load_plugins()\n"
        "assert cnnforge.get('architecture', 'simple_cnn')\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert not heavy, heavy[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
