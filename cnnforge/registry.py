"""One registry for every plugin kind: a dict, a decorator, glob listing, and discovery.

Plugins are found the same way whether they ship with cnnforge or with a stranger's package:
the entry-point group ``cnnforge.plugins`` names modules whose import registers plugins through
the decorators below. Single files or modules come from ``--plugin PATH`` or ``CNNFORGE_PLUGINS``.
A module found by discovery that fails to import is recorded by name with its cause (a warning;
the others still load). A file or module the user named is an error naming the file, the line
and the cause: the user asked for it, so going on without it would search something else.

Plugin modules must not import TensorFlow or Keras at module level (import them inside the
functions), so that listing plugins stays instant.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cnnforge.core.contract import PLUGIN_ENTRY_POINT_GROUP, PLUGIN_KINDS
from cnnforge.core.errors import CnnforgeError

KINDS = PLUGIN_KINDS
ENTRY_POINT_GROUP = PLUGIN_ENTRY_POINT_GROUP
ENV_VAR = "CNNFORGE_PLUGINS"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Plugin:
    """A registered plugin: what it is, where it came from, and the callable that does the work."""

    name: str
    kind: str
    fn: Callable[..., Any]
    description: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)


_plugins: dict[str, dict[str, Plugin]] = {kind: {} for kind in KINDS}
_load_errors: dict[str, str] = {}
_loaded_sources: set[str] = set()
_current_source = "__main__"


def _default_name(obj: Any) -> str:
    """A function's or class's name; a KerasTuner HyperModel instance's ``name`` or class name."""
    return getattr(obj, "__name__", None) or getattr(obj, "name", None) or type(obj).__name__


def register(kind: str, name: str | None = None, **info: Any) -> Callable[[F], F]:
    """Decorator that registers ``fn`` as a plugin of ``kind`` under ``name`` (default: its name).

    Extra keyword arguments are kept in ``Plugin.info`` (a backbone's native input size, say).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")

    def decorator(fn: F) -> F:
        plugin_name = name or _default_name(fn)
        doc = (fn.__doc__ or "").strip().splitlines()
        description = info.pop("description", None) or (doc[0] if doc else "")
        existing = _plugins[kind].get(plugin_name)
        if existing is not None and existing.source != _current_source:
            raise CnnforgeError(
                f"{kind} plugin {plugin_name!r} from {_current_source} clashes with the one from "
                f"{existing.source}; rename one of them"
            )
        _plugins[kind][plugin_name] = Plugin(
            plugin_name, kind, fn, description, _current_source, dict(info)
        )
        return fn

    return decorator


# The shapes an architecture plugin takes (``Plugin.info["form"]``), told apart at registration.
FEATURES, MODEL, HYPERMODEL = "features", "model", "hypermodel"
ARCHITECTURE_SHAPES = (
    "build(hp, inputs, spec) -> features, build(hp) or build(hp, spec) -> keras.Model, "
    "or a keras_tuner.HyperModel subclass or instance"
)


def _is_hypermodel(obj: Any) -> bool:
    """A ``keras_tuner.HyperModel`` subclass or instance, told without importing keras_tuner."""
    cls = obj if inspect.isclass(obj) else type(obj)
    return any(
        c.__name__ == "HyperModel" and c.__module__.startswith("keras_tuner")
        for c in inspect.getmro(cls)
    )


def _required_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` needs; None if it takes ``*args`` or cannot be told."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in parameters)


def architecture_form(obj: Any, name: str) -> dict[str, Any]:
    """What ``obj`` is among the architecture shapes: ``{"form": ..., "takes_spec": ...}``."""
    where = f"architecture plugin {name!r} (from {_current_source})"
    if _is_hypermodel(obj):
        if inspect.isclass(obj) and _required_positional(obj.__init__) not in (1, None):
            raise CnnforgeError(
                f"{where}: {obj.__name__}() needs arguments; register an instance instead: "
                f"cnnforge.architecture({name!r})({obj.__name__}(...))"
            )
        return {"form": HYPERMODEL, "takes_spec": False}
    if not callable(obj) or inspect.isclass(obj):
        raise CnnforgeError(f"{where} is a {type(obj).__name__}; register {ARCHITECTURE_SHAPES}")
    count = _required_positional(obj)
    if count == 3:
        return {"form": FEATURES, "takes_spec": True}
    if count in (1, 2):
        return {"form": MODEL, "takes_spec": count == 2}
    takes = "*args" if count is None else f"{count} argument(s)"
    raise CnnforgeError(f"{where} takes {takes}; register {ARCHITECTURE_SHAPES}")


def _pixel_range(value: Any, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = 0.0
    if not low < high:
        raise CnnforgeError(
            f"architecture plugin {name!r}: pixel_range={value!r} must be (low, high) with low < "
            "high, e.g. (0, 1), (-1, 1) or (0, 255)"
        )
    return (low, high)


def _priors(value: Any, name: str) -> Any:
    if callable(value) or (
        isinstance(value, (list, tuple)) and all(isinstance(p, dict) for p in value)
    ):
        return value
    raise CnnforgeError(
        f"architecture plugin {name!r} (from {_current_source}): priors= takes a list of "
        "{hyperparameter: value} dicts or a function of the DataSpec returning one, got "
        f"{type(value).__name__}"
    )


def architecture(
    name: str | None = None,
    *,
    pixel_range: tuple[float, float] | None = None,
    recipe: bool = False,
    priors: Any = None,
    **info: Any,
) -> Callable[[F], F]:
    """Register an architecture in any of the shapes Keras and KerasTuner users write:

    - ``build(hp, inputs, spec) -> features``: the body between cnnforge's input (pixels scaled
      to 0–1) and cnnforge's softmax; a 2-D ``(batch, features)`` tensor;
    - ``build(hp)`` or ``build(hp, spec) -> keras.Model``: a whole classifier, its own input and
      softmax, compiled or not;
    - a ``keras_tuner.HyperModel`` subclass (built with no arguments) or instance: its ``build``,
      and its ``fit`` when it overrides it.

    A whole model says which pixels it takes by a ``Rescaling`` or ``Normalization`` first layer
    (raw 0–255 pixels) or by ``pixel_range=(low, high)``: cnnforge scales raw 0–255 pixels to it.
    A compiled whole model trains with its own optimizer and loss; ``recipe=True`` (or leaving
    it uncompiled) searches cnnforge's training recipe instead.

    ``priors``: known-good settings the ``auto`` search tries first, best first: a list of
    ``{hyperparameter: value}`` dicts (names left out take their defaults), or a function of
    the ``DataSpec`` returning one (to adapt them to the image size and channels).
    """

    def decorator(obj: F) -> F:
        plugin_name = name or _default_name(obj)
        extra = architecture_form(obj, plugin_name)
        if extra["form"] == FEATURES and (pixel_range is not None or recipe):
            given = "pixel_range" if pixel_range is not None else "recipe"
            raise CnnforgeError(
                f"architecture plugin {plugin_name!r} (from {_current_source}): {given}= is for "
                "a whole model (build(hp) or build(hp, spec), or a HyperModel); a build(hp, "
                "inputs, spec) plugin always takes pixels scaled to 0-1 and the searched recipe: "
                f"drop {given}="
            )
        if pixel_range is not None:
            extra["pixel_range"] = _pixel_range(pixel_range, plugin_name)
        if recipe:
            extra["recipe"] = True
        if priors is not None:
            extra["priors"] = _priors(priors, plugin_name)
        return register("architecture", plugin_name, **info, **extra)(obj)

    return decorator


def backbone(name: str | None = None, **info: Any) -> Callable[[F], F]:
    """Register a pretrained feature extractor (``info``: ``native_size``, ``min_size``)."""
    return register("backbone", name, **info)


def dataset(name: str | None = None, **info: Any) -> Callable[[F], F]:
    """Register ``load(path) -> RawData``; ``path`` is the part after ``NAME:`` or None."""
    return register("dataset", name, **info)


def _import_as(
    key: str, source: str, importer: Callable[[], object], file: str | None = None
) -> None:
    """Run ``importer`` once per ``key``, registrations attributed to ``source``; record failures
    (``file``: the plugin's own file, whose line in the traceback the failure names)."""
    global _current_source
    if key in _loaded_sources:
        return
    _loaded_sources.add(key)
    previous, _current_source = _current_source, source
    try:
        importer()
    except Exception as exc:  # a broken plugin must not take the others down
        _load_errors[key] = _describe_failure(exc, file)
    finally:
        _current_source = previous


def _describe_failure(exc: BaseException, file: str | None = None) -> str:
    """The cause and, where it can be told, the file and line: a SyntaxError carries them; for
    anything else the innermost traceback frame in ``file``."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if file:
        target = os.path.realpath(file)
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if os.path.realpath(f.filename) == target
        ]
        if frames:
            return f"{cause.rstrip(': ')} ({file}, line {frames[-1].lineno})"
    return cause.rstrip(": ")


def _module_file(name: str) -> str | None:
    """Where the module ``name`` lives, without importing it (None if it cannot be found)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _import_file(path: Path) -> None:
    module_name = f"cnnforge_user_plugin_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)


def _load_path(spec: str, origin: str) -> None:
    """Import the file or module ``spec`` the user named (``origin``: where); failing is an error."""
    path = Path(spec).expanduser()
    is_file = path.suffix == ".py" or os.sep in spec
    if is_file:
        if not path.is_file():
            raise CnnforgeError(f"plugin file {spec} ({origin}) does not exist; check the path")
        key = str(path)
        _import_as(key, key, lambda: _import_file(path.resolve()), file=str(path))
    else:
        key = spec
        _import_as(spec, spec, lambda: importlib.import_module(spec), file=_module_file(spec))
    if key in _load_errors:
        what = "plugin file" if is_file else "plugin module"
        raise CnnforgeError(
            f"{what} {key} ({origin}) failed to import: {_load_errors[key]}; fix it, or leave "
            "it out"
        )


def load_plugins(paths: Iterable[str] = ()) -> None:
    """Discover plugins: entry points, then ``CNNFORGE_PLUGINS``, then ``paths``. Idempotent.

    An installed plugin that fails to import is skipped (``load_errors`` says why); a file or
    module named in ``CNNFORGE_PLUGINS`` or ``paths`` that fails raises ``CnnforgeError``.
    """
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        _import_as(f"{dist}:{ep.name}", dist, ep.load, file=_module_file(ep.module))
    for spec in [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]:
        _load_path(spec, f"from {ENV_VAR}")
    for spec in paths:
        _load_path(spec, "from --plugin")


def load_errors() -> dict[str, str]:
    """Plugin sources that failed to import, with the cause."""
    return dict(_load_errors)


def list_plugins(pattern: str = "*", kind: str | None = None) -> list[Plugin]:
    """Registered plugins whose name matches the glob ``pattern``, sorted by kind then name."""
    kinds = [kind] if kind else list(KINDS)
    return [
        plugin
        for k in kinds
        for name, plugin in sorted(_plugins[k].items())
        if fnmatch.fnmatchcase(name, pattern)
    ]


def get(kind: str, name: str) -> Plugin:
    """The plugin ``name`` of ``kind``, or an error that suggests the closest names. Installed
    plugins are discovered first if nothing has done so yet (the Python API needs no setup)."""
    if name not in _plugins[kind]:
        load_plugins()
    try:
        return _plugins[kind][name]
    except KeyError:
        raise CnnforgeError(_unknown_message(kind, name)) from None


def find(name: str) -> Plugin:
    """The plugin called ``name`` whatever its kind."""
    for kind in KINDS:
        if name in _plugins[kind]:
            return _plugins[kind][name]
    raise CnnforgeError(_unknown_message(None, name))


def _unknown_message(kind: str | None, name: str) -> str:
    names = [p.name for p in list_plugins(kind=kind)]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    label = f"{kind} plugin" if kind else "plugin"
    hint = f"did you mean {', '.join(close)}?" if close else "see `cnnforge plugins list`"
    message = f"unknown {label} {name!r}; {hint}"
    if _load_errors:
        message += (
            f" ({len(_load_errors)} plugin source(s) failed to load: {', '.join(_load_errors)})"
        )
    return message
