"""The data options of a search: image size, resize policy, interpolation, class weights."""

from __future__ import annotations

import pytest

from cnnforge import CnnforgeError, Preprocessing
from cnnforge.tuning.config import SearchConfig


def test_options_become_the_requested_preprocessing():
    config = SearchConfig.from_options(
        {"data": "photos", "image_size": "48x64", "resize": "pad", "interpolation": "area"}
    )
    config.validate()
    assert config.preprocessing() == Preprocessing(
        size=(48, 64), policy="pad", interpolation="area"
    )
    assert {"image_size", "resize", "interpolation"} <= set(config.identity())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", "big", "image size 'big' is not N or HxW"),
        ("resize", "squash", "resize policy 'squash' is unknown"),
        ("interpolation", "cubic", "interpolation 'cubic' is unknown"),
        ("class_weight", "balanced", "--class-weight takes auto"),
    ],
)
def test_bad_data_options_are_one_line(field, value, message):
    with pytest.raises(CnnforgeError, match=message):
        SearchConfig(**{field: value}).validate()


def test_a_config_from_an_older_cnnforge_takes_the_defaults():
    saved = SearchConfig().to_json()
    for key in ("image_size", "resize", "interpolation", "strict_data", "class_weight"):
        del saved[key]
    assert SearchConfig.from_json(saved).identity() == SearchConfig().identity()
