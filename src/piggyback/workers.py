"""How many processes decode images beside training: the `num_workers` setting.

"auto" (the default) is resolved here and nowhere else. On the CPU it means none: the
training process's threads already use every core, so worker processes would only take
cores from the forward and backward passes. On a GPU it means one per free CPU core,
up to `MAX_AUTO_WORKERS`: the cores this process may run on, shared among the training
processes of the node (torchrun's LOCAL_WORLD_SIZE), less one for each process itself.
An integer is taken as it is (0: decode in the training process).

The module imports no torch, so that the command line can check the flag quickly.

Example:
    >>> resolve_workers("auto", "cpu"), resolve_workers(3, "cuda")
    (0, 3)
"""

from __future__ import annotations

import os
from typing import Literal

from .errors import ConfigError

AUTO = "auto"
MAX_AUTO_WORKERS = 8  # past this, more decoding processes rarely feed one GPU faster
Workers = int | Literal["auto"]


def check_workers(value: object) -> Workers:
    """`value` if it is "auto" or an integer >= 0; a ConfigError naming it if not."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value  # type: ignore[return-value]
    raise ConfigError(
        f"num_workers must be 'auto' or an integer >= 0, got {value!r}; 'auto' chooses "
        "from the machine (0 on the CPU), 0 decodes images in the training process"
    )


def workers(text: str) -> Workers:
    """The command line's `--num-workers`: "auto" or an integer >= 0."""
    return check_workers(int(text) if text.strip().isdigit() else text)


def resolve_workers(setting: Workers, device_type: str) -> int:
    """The number of worker processes that `setting` means on a `device_type` device."""
    if setting != AUTO:
        return int(setting)
    if device_type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, (cores or 1) // max(1, processes) - 1))
