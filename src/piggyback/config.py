"""Settings of the masks: what is masked and how scores become masks."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError
from .recipes import DEFAULT_RECIPE

ThresholdFn = Literal["binarizer", "ternarizer"]
ScoreInit = Literal["1s", "uniform", "weight_based"]

THRESHOLD_FNS: tuple[str, ...] = ("binarizer", "ternarizer")
SCORE_INITS: tuple[str, ...] = ("1s", "uniform", "weight_based")


@dataclass(frozen=True)
class MaskConfig:
    """How a backbone is masked. The defaults are the paper's except `train_bn`: each
    task gets its own norm layers (the "default" recipe; the paper froze them, see
    `piggyback.recipes`).

    Module selection follows PEFT: a `str` is a regular expression matched against
    the whole module name; a list holds exact names or name suffixes (``"fc"``
    matches ``"layer4.0.fc"``). ``head=None`` picks timm's ``get_classifier()``
    when the backbone has one, else the last ``nn.Linear``.

    Example:
        >>> MaskConfig(threshold_fn="ternarizer", exclude_modules=["conv1"]).threshold
        0.005
    """

    threshold: float = 5e-3
    threshold_fn: ThresholdFn = "binarizer"
    init: ScoreInit = "1s"
    init_scale: float = 1e-2
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    train_bn: bool = DEFAULT_RECIPE.train_bn
    head: str | None = None

    def __post_init__(self) -> None:
        if self.threshold_fn not in THRESHOLD_FNS:
            raise ConfigError(
                f"threshold_fn={self.threshold_fn!r} is not known; expected one of {THRESHOLD_FNS}"
            )
        if self.init not in SCORE_INITS:
            raise ConfigError(f"init={self.init!r} is not known; expected one of {SCORE_INITS}")
        _check_number("threshold", self.threshold, minimum=0.0)
        _check_number("init_scale", self.init_scale, minimum=0.0, strict=True)
        if self.init in ("1s", "uniform") and self.init_scale <= self.threshold:
            raise ConfigError(
                f"init_scale={self.init_scale} must exceed threshold={self.threshold} with "
                f"init={self.init!r}, or the first mask would drop every weight"
            )
        if not isinstance(self.train_bn, bool):
            raise ConfigError(f"train_bn must be True or False, got {self.train_bn!r}")
        if self.head is not None and (not isinstance(self.head, str) or not self.head):
            raise ConfigError(f"head must be a module name or None, got {self.head!r}")
        for name in ("target_modules", "exclude_modules"):
            object.__setattr__(self, name, _check_selector(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready settings, as stored in task files."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskConfig:
        """Rebuild from `to_dict` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MaskConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ConfigError(f"{name}={value} is out of range; expected {bound}")


def _check_selector(name: str, value: object) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression: {exc}") from exc
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a regex string or a list of module names, got {value!r}")


def matches(selector: str | list[str], name: str) -> bool:
    """Whether a module name is picked by a PEFT-style selector (regex or names/suffixes)."""
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)
