"""Settings of the server, checked once so a bad flag fails before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, caches and guards its uploads.

    `batch_window_ms` is how long the first waiting request may wait for others to share
    its batch; `max_batch` caps the images in one forward pass (and in one request);
    `cache_size` is how many tasks are kept as baked plain models (0: none, every
    request runs through the masked model); `max_upload_mb` caps a request body;
    `admin_token`, when set, guards adding and deleting tasks.

    Example:
        >>> ServeConfig(cache_size=0).max_upload_bytes
        16777216
    """

    batch_window_ms: float = 5.0
    max_batch: int = 32
    cache_size: int = 4
    max_upload_mb: float = 16.0
    admin_token: str | None = None

    def __post_init__(self) -> None:
        _check_number("batch_window_ms", self.batch_window_ms, allow_zero=True)
        _check_number("max_upload_mb", self.max_upload_mb, allow_zero=False)
        for name, minimum in (("max_batch", 1), ("cache_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.admin_token is not None and (
            not isinstance(self.admin_token, str) or not self.admin_token.strip()
        ):
            raise ConfigError("admin_token must be a non-empty string or None")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _check_number(name: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
