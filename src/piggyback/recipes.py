"""Named training recipes: the library's default and the paper's exact one.

A recipe fixes the settings that decide whether mask training works at all: the
scores' and the head's learning rates and whether each task gets its own norm layers.
`TrainConfig()` and `MaskConfig()` default to the "default" recipe; "paper" is the
recipe of Mallya et al. (frozen BatchNorm, Adam at 1e-4 for scores and head), kept for
comparison. docs/method.md says why the default departs from it: with frozen norms a
mask that moves at the backbone's native resolution makes the network collapse to
chance.

Example:
    >>> RECIPES["paper"].train_bn
    False
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """The settings a recipe fixes; everything else keeps its default."""

    lr: float
    head_lr: float
    train_bn: bool
    summary: str


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        lr=3e-4,
        head_lr=1e-3,
        train_bn=True,
        summary="per-task norms, re-estimated under each epoch's mask; scores lr 3e-4",
    ),
    "paper": Recipe(
        lr=1e-4,
        head_lr=1e-4,
        train_bn=False,
        summary="Mallya et al.: frozen BatchNorm, Adam 1e-4 for scores and head",
    ),
}
DEFAULT_RECIPE = RECIPES["default"]


def recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is a ConfigError listing the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not known; expected one of {list(RECIPES)}")
    return RECIPES[name]
