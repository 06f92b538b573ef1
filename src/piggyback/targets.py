"""Which layers of a backbone piggyback wraps, and the checks that a backbone can be wrapped."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import MaskConfig, matches
from .errors import ConfigError
from .layers import MASKABLE_TYPES, NORM_TYPES


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> Any:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    return new


def refuse_untracked_statistics(backbone: nn.Module) -> None:
    """A layer with running statistics that piggyback does not wrap would update the
    frozen backbone's statistics in train mode: refuse it, naming it."""
    for name, module in backbone.named_modules():
        has_stats = any(b.endswith("running_mean") for b, _ in module.named_buffers(recurse=False))
        if has_stats and not isinstance(module, NORM_TYPES):
            raise ConfigError(
                f"layer {name!r} ({type(module).__name__}) keeps running statistics but is not "
                f"a norm type piggyback can freeze ({[t.__name__ for t in NORM_TYPES]}); "
                "training would change the backbone. Replace it, or subclass a supported norm"
            )


def refuse_aliases(backbone: nn.Module, names: list[str]) -> None:
    """A layer registered under two names would be wrapped under one and run unmasked
    under the other: refuse it, naming both."""
    first: dict[int, str] = {}
    for name, module in backbone.named_modules(remove_duplicate=False):
        if first.setdefault(id(module), name) != name and first[id(module)] in names:
            raise ConfigError(
                f"layer {first[id(module)]!r} is also registered as {name!r}; piggyback "
                "masks a layer under one name only: register it once, or exclude it "
                "with MaskConfig(exclude_modules=[...])"
            )


def find_head(backbone: nn.Module, head: str | None) -> str:
    """The classifier's module name: given, timm's get_classifier(), or the last Linear."""
    names = {id(m): n for n, m in backbone.named_modules() if n}
    if head is not None:
        if head not in set(names.values()):
            raise ConfigError(f"head={head!r} is not a module of this backbone")
        return head
    get_classifier = getattr(backbone, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module) and id(classifier) in names:
            return names[id(classifier)]
    linear = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(
            "found no classifier head (no get_classifier() and no nn.Linear); "
            "name it with MaskConfig(head='module.name')"
        )
    return linear[-1]


def select_targets(backbone: nn.Module, config: MaskConfig, head: str) -> list[str]:
    """Names of the layers to mask: supported types, picked by the config, never the head."""
    supported = [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, MASKABLE_TYPES) and n != head and not n.startswith(head + ".")
    ]
    chosen = [
        n
        for n in supported
        if (config.target_modules is None or matches(config.target_modules, n))
        and (config.exclude_modules is None or not matches(config.exclude_modules, n))
    ]
    if not chosen:
        sample = ", ".join(supported[:6]) or "none"
        raise ConfigError(
            f"no layer to mask: target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}. Supported types are "
            f"{[t.__name__ for t in MASKABLE_TYPES]}; such layers here: {sample}"
        )
    return chosen
