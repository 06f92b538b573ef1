"""Settings of the server, checked once so a bad flag fails before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..precision import Amp, check_amp
from ..taskinfer import DEFAULT_RULE, RULES


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, caches, bounds its work and guards its routes.

    Batching: `batch_window_ms` is how long the first waiting request may wait for others
    to share its batch; `max_batch` caps the images in one forward pass (and in one
    request); `cache_size` is how many tasks are kept as baked plain models (0: none).
    On the CPU a forward pass runs on one of torch's threads per `images_per_thread`
    images of each task in it (at least one; 0: always all): a mix of tasks splits a
    batch into groups of one or two images, whose threads spend more time waiting on
    each other than working while the event loop, decoding the next requests, needs a
    core (bench/serve.py, EfficientNet-Lite0 at 224 px on 2 cores, three runs each: a
    20-task mix served 31.8-35.8 requests/s on both threads and 38.8-43.5 with 2, one task
    44-58 either way). Where latency at low load matters more than throughput under
    load, on many cores, 0 keeps every forward on all threads.

    Limits, because clients and task files are not trusted: `max_upload_mb` caps a request
    body; `max_input_size` caps the input size (px) a task may ask for, since every image
    of that task is resized to it; `max_request_pixels` caps the decoded pixels of one
    request's images together; `header_timeout_s` and `body_timeout_s` are how long a
    client may take to send its request head and its body.

    Precision: `amp` runs every forward pass under torch.autocast ("bf16"; "fp16" needs
    CUDA); the answers are the same classes at the precision's rounding.

    Task inference: with `infer_task`, a prediction request without a task gets each
    image's task inferred among the tasks served (`piggyback.taskinfer`, by `infer_rule`;
    k forward passes for k tasks), or none when it looks like none of them.

    Access: `admin_token` guards adding and deleting tasks, which are off without one
    unless `allow_unauthenticated_writes`; `read_token`, when set, guards predictions and
    the task list (the admin token opens them too). ``/health`` is always open.

    Example:
        >>> ServeConfig(cache_size=0).max_upload_bytes
        16777216
        >>> ServeConfig(admin_token="s3cret").writes
        'guarded by the admin token'
    """

    batch_window_ms: float = 5.0
    max_batch: int = 32
    cache_size: int = 4
    images_per_thread: int = 2
    max_upload_mb: float = 16.0
    max_input_size: int = 512
    max_request_pixels: int = 50_000_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    admin_token: str | None = None
    read_token: str | None = None
    allow_unauthenticated_writes: bool = False
    infer_task: bool = False
    infer_rule: str = DEFAULT_RULE
    infer_threshold: float | None = None  # None: the rule's (taskinfer.DEFAULT_THRESHOLDS)
    amp: Amp | None = None

    def __post_init__(self) -> None:
        _check_number("batch_window_ms", self.batch_window_ms, allow_zero=True)
        for name in ("max_upload_mb", "header_timeout_s", "body_timeout_s"):
            _check_number(name, getattr(self, name), allow_zero=False)
        for name, minimum in (
            ("max_batch", 1),
            ("cache_size", 0),
            ("images_per_thread", 0),
            ("max_input_size", 1),
            ("max_request_pixels", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("admin_token", "read_token"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty string or None")
        if not isinstance(self.infer_task, bool):
            raise ConfigError(f"infer_task must be True or False, got {self.infer_task!r}")
        if self.infer_rule not in RULES:
            raise ConfigError(f"infer_rule={self.infer_rule!r}; expected one of {RULES}")
        if self.infer_threshold is not None:
            _check_number("infer_threshold", self.infer_threshold, allow_zero=True)
        check_amp(self.amp)
        if not isinstance(self.allow_unauthenticated_writes, bool):
            raise ConfigError(
                "allow_unauthenticated_writes must be True or False, "
                f"got {self.allow_unauthenticated_writes!r}"
            )
        if self.allow_unauthenticated_writes and self.admin_token is not None:
            raise ConfigError(
                "pass either an admin token (writes need it) or allow_unauthenticated_writes "
                "(writes need nothing), not both"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def writes(self) -> str:
        """Who may add and delete tasks, in words."""
        if self.admin_token is not None:
            return "guarded by the admin token"
        if self.allow_unauthenticated_writes:
            return "open to anyone (--allow-unauthenticated-writes)"
        return "off (start with --admin-token TOKEN to allow them)"

    @property
    def access(self) -> str:
        """The one line `piggyback serve` prints at start-up: who may do what."""
        reads = "guarded by the read token" if self.read_token is not None else "open to anyone"
        return f"task uploads and deletions: {self.writes}; predictions and task list: {reads}"


def _check_number(name: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
