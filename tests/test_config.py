"""MaskConfig validation: bad values name themselves and what is allowed."""

from __future__ import annotations

import pytest

from piggyback import ConfigError, MaskConfig
from piggyback.config import matches


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_fn": "sigmoid"}, "threshold_fn='sigmoid'"),
        ({"init": "zeros"}, "init='zeros'"),
        ({"threshold": -1.0}, "threshold=-1.0"),
        ({"threshold": "a"}, "threshold must be a number"),
        ({"init_scale": 0.0}, "init_scale=0.0"),
        ({"init_scale": 1e-3}, "must exceed threshold"),
        ({"train_bn": "yes"}, "train_bn must be True or False"),
        ({"target_modules": "conv[("}, "not a valid regular expression"),
        ({"exclude_modules": [1, 2]}, "exclude_modules must be"),
        ({"head": ""}, "head must be"),
    ],
)
def test_bad_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MaskConfig(**kwargs)


def test_round_trip_and_unknown_keys() -> None:
    config = MaskConfig(threshold_fn="ternarizer", target_modules=["conv1"], train_bn=True)
    assert MaskConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown MaskConfig keys"):
        MaskConfig.from_dict({"thresh": 1})


@pytest.mark.parametrize(
    ("selector", "name", "expected"),
    [
        (["fc"], "layer4.fc", True),
        (["fc"], "fc", True),
        (["fc"], "xfc", False),
        (["layer1.0.conv1"], "layer1.0.conv1", True),
        (r"layer\d\.0\..*", "layer3.0.conv2", True),
        (r"conv", "layer1.conv", False),  # a regex must match the whole name
    ],
)
def test_selectors(selector: str | list[str], name: str, expected: bool) -> None:
    assert matches(selector, name) is expected
