"""The search space a run searches: the plugin's, with ``--fix`` and ``--space`` applied."""

from __future__ import annotations

import difflib
from typing import Any

import keras_tuner

from cnnforge.core.errors import CnnforgeError
from cnnforge.tuning.config import SearchConfig


def _typed(hp: Any, text: str) -> Any:
    """Parse ``text`` as a value of the hyperparameter ``hp``."""
    example = hp.default if hp.default is not None else getattr(hp, "values", [text])[0]
    try:
        if isinstance(example, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return type(example)(text)
    except ValueError:
        raise CnnforgeError(
            f"hyperparameter {hp.name!r} takes {type(example).__name__} values, got {text!r}"
        ) from None


def constrained_hyperparameters(config: SearchConfig, space: list) -> keras_tuner.HyperParameters:
    """KerasTuner HyperParameters with ``--fix`` and ``--space`` applied, names checked."""
    by_name = {hp.name: hp for hp in space}
    for name in [*config.fix, *config.space]:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"choose from {', '.join(by_name)}"
            )
            raise CnnforgeError(f"{config.model_name!r} has no hyperparameter {name!r}; {hint}")
    hps = keras_tuner.HyperParameters()
    for name, text in config.fix.items():
        hps.Fixed(name, _typed(by_name[name], text))
    for name, texts in config.space.items():
        values = [_typed(by_name[name], t) for t in texts]
        hps.Choice(name, values, default=values[0])
    return hps
