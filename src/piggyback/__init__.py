"""piggyback: add many tasks to one frozen pretrained network, one binary mask per task.

Mallya, Davis & Lazebnik, "Piggyback: Adapting a Single Network to Multiple Tasks
by Learning to Mask Weights" (ECCV 2018).
"""

from .config import MaskConfig
from .errors import (
    BackboneMismatchError,
    ConfigError,
    DataError,
    PiggybackError,
    TaskFileError,
    TaskFileNotFoundError,
    UnknownTaskError,
)
from .functional import Binarizer, Ternarizer, threshold_scores
from .layers import MaskedLayer, TaskHead, TaskNorm
from .model import MaskStats, PiggybackModel, load, save
from .store import fingerprint, read_task_file

__version__ = "0.1.0"

__all__ = [
    "BackboneMismatchError",
    "Binarizer",
    "ConfigError",
    "DataError",
    "MaskConfig",
    "MaskStats",
    "MaskedLayer",
    "PiggybackError",
    "PiggybackModel",
    "TaskFileError",
    "TaskFileNotFoundError",
    "TaskHead",
    "TaskNorm",
    "Ternarizer",
    "UnknownTaskError",
    "__version__",
    "fingerprint",
    "load",
    "read_task_file",
    "save",
    "threshold_scores",
]
