"""The backbone a server runs, chosen so that no single task file decides it.

`--backbone`/`--weights` decide when given: then no file's metadata matters. Otherwise
the readable task files vote: each records a backbone (name, weights file, fingerprint),
and the records are tried most common first (ties: the one on the oldest file, so a
recent upload does not go first); the first that builds, and builds the backbone whose
fingerprint it records, wins. A record that does not build, or builds another backbone,
only loses. With no winner, the embedded default.

Which files are then served is decided by the fingerprint alone: a task file runs on the
backbone whose state it was made on, whatever name or weights path it records, so a
file with a wrong name, a stale path or a damaged body never stops a start-up (the
registry skips what does not load, and says why).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..backbones import DEFAULT_BACKBONE, InputSpec, create_backbone, input_spec
from ..config import MaskConfig
from ..errors import PiggybackError
from ..model import PiggybackModel
from ..pipeline import check_recorded_layers
from ..store import fingerprint, read_task_file, task_config, task_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    """The backbone one task file records."""

    backbone: str
    weights: str | None
    fingerprint: str

    def __str__(self) -> str:
        weights = self.weights or "its own weights"
        return f"{self.backbone} ({weights}, fingerprint {self.fingerprint[:12]})"


def build_model(
    directory: str | Path, *, backbone: str | None = None, weights: str | Path | None = None
) -> tuple[PiggybackModel, InputSpec]:
    """An empty model for the tasks in `directory`, and its backbone's input spec.

    The mask config is the one most files of the chosen backbone record that wraps it
    (selecting exactly the layers those files mask; files masking other layers are
    skipped by the registry), else the default.

    Example:
        >>> model, spec = build_model("tasks/", backbone="resnet18")  # doctest: +SKIP
    """
    files = _readable(task_files(directory))
    if backbone is not None:
        net = create_backbone(backbone, weights=weights)
    else:
        net = _voted(files, None if weights is None else str(weights))
    own, spec = fingerprint(net), input_spec(net)
    configs = Counter(
        json.dumps(task_config(meta).to_dict(), sort_keys=True)
        for meta in files.values()
        if meta["backbone"]["fingerprint"] == own
    )
    for config, _ in configs.most_common():  # a config that does not wrap this net loses
        try:
            return PiggybackModel(net, MaskConfig.from_dict(json.loads(config))).eval(), spec
        except PiggybackError as exc:
            log.error("task files record a mask config that does not fit the backbone: %s", exc)
    return PiggybackModel(net).eval(), spec


def _readable(paths: list[Path]) -> dict[Path, dict[str, Any]]:
    """The metadata of each file that reads (every field checked by `read_task_file`);
    the registry reports the others."""
    found = {}
    for path in paths:
        try:
            found[path] = read_task_file(path)[0]
        except PiggybackError:
            continue
    return found


def _voted(files: dict[Path, dict[str, Any]], weights: str | None) -> nn.Module:
    """The backbone that most files record and that builds as recorded."""
    votes: Counter[_Record] = Counter()
    oldest: dict[_Record, float] = {}
    layers: dict[_Record, dict[str, tuple[int, ...]]] = {}
    for path, meta in files.items():
        extra = meta.get("metadata") or {}
        record = _Record(
            backbone=extra.get("backbone") or DEFAULT_BACKBONE,
            weights=weights if weights is not None else extra.get("weights"),
            fingerprint=meta["backbone"]["fingerprint"],
        )
        votes[record] += 1
        oldest[record] = min(oldest.get(record, float("inf")), path.stat().st_mtime)
        layers.setdefault(record, {n: tuple(s) for n, s in meta["mask"]["layers"]})
    for record in sorted(votes, key=lambda r: (-votes[r], oldest[r])):
        try:  # sized on the meta device first: a file cannot make us build a giant
            check_recorded_layers(record.backbone, layers[record])
            net = create_backbone(record.backbone, weights=record.weights)
        except Exception as exc:  # a name or path from a file: any library may fail on it
            log.error("task files record backbone %s that does not build: %s", record, exc)
            continue
        if fingerprint(net) == record.fingerprint:
            return net
        log.error("task files record backbone %s, which builds another backbone", record)
    if votes:
        log.error(
            "no backbone the task files record builds as recorded; serving on the embedded "
            "default %s: pass --backbone/--weights to choose",
            DEFAULT_BACKBONE,
        )
    return create_backbone(DEFAULT_BACKBONE, weights=weights)
