"""The served tasks: one backbone, every task file of a folder, and a cache of baked tasks.

The backbone is held once, inside one `PiggybackModel`; each task adds its bit-packed
mask (1-2 bits per masked weight) and its head. Running a task on the masked model
costs a task switch (unpack the mask and form W * mask), which the masked layers cache
for the last task only (by default: `PiggybackModel.weight_cache_size`), so a mix of
tasks would switch on nearly every batch. The hottest tasks are therefore also kept
baked (`PiggybackModel.bake`: a plain copy of the backbone with W * mask in it), which
runs at exactly the plain backbone's speed. Other tasks still run, through the masked
model, in one mixed-task forward pass. Memory is about 2 + `cache_size` backbones'
weights (the frozen one, the masked layers' cached W * mask, one per baked task) plus
each task's mask and head.

Task files are not trusted: a file that does not load at start-up is skipped (and listed
in `skipped` with the reason) rather than stopping the server, and no task may ask for
inputs larger than `max_input_size`, since every one of its images is resized to it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import InputSpec
from ..errors import ConfigError, PiggybackError, TaskFileError, UnknownTaskError
from ..model import PiggybackModel
from ..precision import Amp, autocast, check_amp
from ..store import (
    SUFFIX,
    PreparedTask,
    read_task_file,
    task_files,
    write_atomic,
)
from ..taskinfer import choose, supported_rules, threshold_for
from .batcher import Job
from .inputs import to_batch

log = logging.getLogger(__name__)


class TaskExistsError(ConfigError):
    """A task file names a task (or a file name) the server already holds."""


@dataclass(frozen=True)
class TaskEntry:
    """What the server knows of one task beyond the model: its file and its input."""

    name: str
    path: Path
    file_bytes: int
    num_classes: int
    class_names: list[str] | None
    spec: InputSpec
    mask: dict[str, Any]
    rules: tuple[str, ...] = ("entropy",)  # task inference's rules its file can be scored by

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": self.class_names,
            "file": self.path.name,
            "file_bytes": self.file_bytes,
            "bits_per_weight": self.mask.get("bits_per_weight"),
            "mask_kind": self.mask.get("kind"),
            "kept": self.mask.get("kept"),
            "input_size": self.spec.size,
            "calibrated": "calibrated" in self.rules,
            "inference_rules": list(self.rules),
        }


ADMIT_RATIO = 2  # how much hotter than its victim a task must be to take a cache slot


class BakedCache:
    """Baked models of the hottest tasks: LRU eviction, frequency admission.

    Baking costs about three task switches, so a task is admitted only into a free slot
    or when it has been used at least ADMIT_RATIO times as often as the least recently
    used task it would evict; otherwise it runs masked. A mix of more equally hot tasks
    than slots thus keeps a stable cached subset instead of baking whenever the counts
    drift (with a plain "more often", a 20-task mix over 4 slots baked in 11 of 15
    batches), and a one-off request never evicts a hot task. Use counts halve every
    `16 * capacity` uses, so a new hot set takes over.

    Example:
        >>> cache = BakedCache(1, bake=lambda task: nn.Identity())
        >>> cache.get("a") is not None, cache.get("b") is None, cache.tasks
        (True, True, ['a'])
    """

    def __init__(self, capacity: int, bake: Callable[[str], nn.Module]) -> None:
        self.capacity = capacity
        self._bake = bake
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._uses: Counter[str] = Counter()
        self._since_aging = 0

    @property
    def tasks(self) -> list[str]:
        """Cached tasks, least recently used first."""
        return list(self._models)

    def get(self, task: str) -> nn.Module | None:
        """The baked model of `task`, baking it if it earns a slot; None: run it masked."""
        if self.capacity == 0:
            return None
        self._count(task)
        if task in self._models:
            self._models.move_to_end(task)
            return self._models[task]
        if len(self._models) >= self.capacity:
            victim = next(iter(self._models))
            if self._uses[task] < ADMIT_RATIO * self._uses[victim]:
                return None
            del self._models[victim]
        self._models[task] = self._bake(task)
        return self._models[task]

    def discard(self, task: str) -> None:
        self._models.pop(task, None)
        self._uses.pop(task, None)

    def _count(self, task: str) -> None:
        self._uses[task] += 1
        self._since_aging += 1
        if self._since_aging >= 16 * self.capacity:
            self._uses = Counter({t: n // 2 for t, n in self._uses.items() if n > 1})
            self._since_aging = 0


class TaskRegistry:
    """Every task file of `directory`, loaded onto one model, and the way to run them.

    Each task is fed at `size` if given, else at the size its file records (what it was
    trained at), else at `spec.size`; never above `max_input_size`. Batches run on the
    model's device, under autocast when `amp` is set, on the CPU with one thread per
    `images_per_thread` images of each task (see `ServeConfig`). One lock guards the
    model: batches and the quick install or removal of a task take turns, so a task never
    changes under a running batch. Reading, checking and decoding an upload (slow for a
    hostile file) happen outside it, while batches run; uploads and deletions take turns
    among themselves under a second lock.

    Example:
        >>> registry = TaskRegistry(model, spec, "tasks/")  # doctest: +SKIP
        >>> registry.infer([Job("birds", images)])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: PiggybackModel,
        spec: InputSpec,
        directory: str | Path,
        *,
        size: int | None = None,
        cache_size: int = 4,
        images_per_thread: int = 2,
        max_input_size: int = 512,
        amp: Amp | None = None,
    ) -> None:
        if model.tasks:
            raise ConfigError(
                f"the model already holds tasks {model.tasks}; pass one without tasks, the "
                "registry loads them from the task directory"
            )
        if size is not None and size > max_input_size:
            raise ConfigError(
                f"input size {size} exceeds the largest this server accepts, {max_input_size}: "
                "pass a smaller size or raise max_input_size (--max-input-size)"
            )
        self.device = next(model.parameters()).device
        check_amp(amp, self.device)
        self.amp = amp
        self.model = model.eval()
        self.spec = spec
        self.size = size
        self.max_input_size = max_input_size
        self.directory = Path(directory)
        self.cache = BakedCache(cache_size, model.bake)
        self.images_per_thread = images_per_thread
        self.skipped: dict[str, str] = {}  # file name -> why it is not served
        self._entries: dict[str, TaskEntry] = {}
        self._lock = threading.Lock()  # the model: batches, installs, removals
        self._writing = threading.Lock()  # the folder and the task list: uploads, deletions
        for path in task_files(self.directory):
            try:
                self._install(*self._prepare(path))
            except PiggybackError as exc:
                self.skipped[path.name] = str(exc).replace(str(path), path.name)
                log.error("skipped task file %s: %s", path.name, self.skipped[path.name])

    # ------------------------------------------------------------------ tasks
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[TaskEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> TaskEntry:
        found = self._entries.get(name)
        if found is None:
            raise UnknownTaskError(f"no task {name!r}; this server holds {self.names}")
        return found

    def add(self, data: bytes) -> TaskEntry:
        """Validate an uploaded task file on the model, then persist it into the folder.

        The library checks it all (safetensors, checksum, every header field, backbone
        fingerprint, layer and head shapes) and decodes it before anything is written, so
        a bad file leaves the folder untouched, and batches run meanwhile.
        """
        with self._writing, tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / f"upload{SUFFIX}"
            staged.write_bytes(data)
            try:
                prepared, entry = self._prepare(staged)  # checks the name: a safe path
            except TaskFileError as exc:  # name the upload, not its temporary path
                raise type(exc)(str(exc).replace(str(staged), "the uploaded file")) from exc
            target = self.directory / f"{entry.name}{SUFFIX}"
            if target.exists():
                raise TaskExistsError(f"{target.name} already exists in the task folder")
            write_atomic(target, data)
            try:
                return self._install(prepared, replace(entry, path=target))
            except BaseException:
                target.unlink(missing_ok=True)
                raise

    def remove(self, name: str) -> None:
        """Delete a task's file, then the task: a failed delete leaves it served."""
        with self._writing:
            self.entry(name).path.unlink(missing_ok=True)
            with self._lock:
                self._unload(name)

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def infer(self, jobs: list[Job]) -> list[torch.Tensor | Exception]:
        """Logits for each job (only its task's classes), or the error of that job alone.

        Jobs are grouped by input shape and by how they run: each cached task through
        its baked model, the others together through the masked model with
        `task_names`. Either way a sample's logits are those of running it alone. Every
        group is queued before any result is read back: on a GPU each read (and each
        blocking upload) holds the host until the device is idle, so per group they
        would run the groups one after another with the host and the device taking turns.
        """
        outcomes: list[torch.Tensor | Exception] = [
            UnknownTaskError(f"task {job.task!r} was deleted") for job in jobs
        ]
        with self._lock:
            live = [i for i, job in enumerate(jobs) if job.task in self._entries]
            tasks = dict.fromkeys(jobs[i].task for i in live)
            baked = {task: self.cache.get(task) for task in tasks}
            groups: dict[tuple[nn.Module | None, torch.Size], list[int]] = {}
            for i in live:
                key = (baked[jobs[i].task], jobs[i].images.shape[1:])
                groups.setdefault(key, []).append(i)
            queued = []
            for (module, _), indices in groups.items():
                batch = torch.cat([jobs[i].images for i in indices])
                batch = batch.to(self.device, non_blocking=True)
                per_task = len(batch) / len({jobs[i].task for i in indices})
                with autocast(self.device, self.amp), self._threads(per_task):
                    if module is None:
                        names = [jobs[i].task for i in indices for _ in range(jobs[i].rows)]
                        logits = self.model(batch, task_names=names)
                    else:
                        logits = module(batch)
                queued.append((indices, logits.float()))
            for indices, logits in queued:
                parts = logits.cpu().split([jobs[i].rows for i in indices])
                for i, part in zip(indices, parts, strict=True):
                    outcomes[i] = part[:, : self._entries[jobs[i].task].num_classes]
        return outcomes

    @contextmanager
    def _threads(self, images_per_task: float) -> Iterator[None]:
        """On the CPU, torch's threads for the block: one per `images_per_thread` images
        of each task, at least one, at most as many as it has."""
        have = torch.get_num_threads()
        wanted = have
        if self.device.type == "cpu" and self.images_per_thread:
            wanted = min(have, max(1, int(images_per_task // self.images_per_thread)))
        if wanted == have:
            yield
            return
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(have)

    @torch.no_grad()
    def infer_tasks(
        self, images: list[bytes], rule: str, threshold: float | None, max_pixels: int
    ) -> list[tuple[TaskEntry | None, float, torch.Tensor | None]]:
        """Each image's task among those served (`piggyback.taskinfer`): its entry, score
        and logits, or (None, the best score, None) where it looks like none of them.

        Images are decoded once per input spec the tasks use, outside the model lock; the
        scores of tasks of different specs compare, each being the task's own measure.
        """
        entries = [e for e in self.entries() if rule in e.rules]
        if not entries:
            raise ConfigError(
                f"no served task can infer with rule {rule!r} (tasks saved by `fit` carry "
                "the calibration it needs); start the server with --infer-rule entropy"
            )
        by_spec: dict[InputSpec, list[TaskEntry]] = {}
        for entry in entries:
            by_spec.setdefault(entry.spec, []).append(entry)
        batches = {spec: to_batch(images, spec, max_pixels) for spec in by_spec}
        order: list[TaskEntry] = []
        scores, logits = [], {}
        with self._lock:
            for spec, group in by_spec.items():
                names = [entry.name for entry in group if entry.name in self._entries]
                if not names:
                    continue  # deleted meanwhile
                with autocast(self.device, self.amp):
                    found = self.model.infer_task(
                        batches[spec].to(self.device, non_blocking=True),
                        tasks=names,
                        rule=rule,
                        threshold=0.0,
                    )
                order += [self._entries[name] for name in names]
                scores.append(found.candidate_scores.float().cpu())
                logits.update({name: v.float().cpu() for name, v in found.logits.items()})
        if not order:
            raise UnknownTaskError("every task was deleted while inferring")
        chosen, best = choose(order, torch.cat(scores, 1), threshold_for(rule, threshold))
        return [
            (None, score, None) if entry is None else (entry, score, logits[entry.name][i])
            for i, (entry, score) in enumerate(zip(chosen, best.tolist(), strict=True))
        ]

    # --------------------------------------------------------------- helpers
    def _prepare(self, path: Path) -> tuple[PreparedTask, TaskEntry]:
        """Read, check and decode the task file at `path` for the model, leaving the model
        untouched: the slow and untrusted half of adding a task, done outside the lock.

        The header is read first for what the server itself refuses (a task already
        served, too large an input) before any mask is decoded.
        """
        contents = read_task_file(path)
        meta = contents[0]
        existing = self._entries.get(meta["task"])
        if existing is not None:
            raise TaskExistsError(
                f"task {meta['task']!r} is already served, from {existing.path.name}; "
                "remove it first"
            )
        spec = self._input(path, meta)
        prepared = self.model.prepare_task(path, read=contents)
        entry = TaskEntry(
            name=prepared.name,
            path=path,
            file_bytes=path.stat().st_size,
            num_classes=prepared.num_classes,
            class_names=prepared.class_names,
            spec=spec,
            mask={k: v for k, v in meta["mask"].items() if k != "layers"},
            rules=supported_rules(meta.get("metadata") or {}),
        )
        return prepared, entry

    def _install(self, prepared: PreparedTask, entry: TaskEntry) -> TaskEntry:
        """Add a prepared task to the model and the task list: quick, under the lock."""
        with self._lock:
            self.model.install_task(prepared)
            self._entries[entry.name] = entry
        return entry

    def _input(self, path: Path, meta: dict[str, Any]) -> InputSpec:
        """How the task of `meta` is fed; refused if that is larger than the server allows."""
        recorded = (meta.get("metadata") or {}).get("size")
        try:
            spec = replace(self.spec, size=self.size or recorded or self.spec.size)
        except ConfigError as exc:
            raise TaskFileError(f"{path} records an unusable input size: {exc}") from exc
        if spec.size > self.max_input_size:
            raise TaskFileError(
                f"{path} asks for {spec.size} px inputs; this server feeds at most "
                f"{self.max_input_size} px (--max-input-size)"
            )
        return spec

    def _unload(self, name: str) -> None:
        self._entries.pop(name, None)
        self.cache.discard(name)
        self.model.remove_task(name)
