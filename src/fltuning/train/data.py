"""The run's examples: the task from the registry, its files from the data directory (or given files), subsets.

    task, examples = load_examples(config.data)      # examples["train"], ["dev"], and ["test"] when present

Everything is read and checked before a run writes anything, so a malformed file fails fast with its file and line
(``DataError``) and leaves no run folder behind.
"""

from __future__ import annotations

import inspect
import random
from pathlib import Path
from typing import Any

from fltuning.tasks.base import DataError, Example, Task
from fltuning.tasks.registry import get_task, task_files, task_spec
from fltuning.train.config import DataArgs, RunConfigError

PARTS = ("train", "dev", "test")


def build_task(data: DataArgs) -> Task:
    """The task named by ``data.task`` with ``data.task_settings``; ``RunConfigError`` for an unknown name or a
    setting the task does not take."""
    try:
        spec = task_spec(data.task)
    except KeyError as err:
        raise RunConfigError(f"--data.task: {err.args[0]}") from err
    try:
        return get_task(spec.name, **data.task_settings)
    except TypeError as err:
        raise RunConfigError(f"--data.task_settings: task {spec.name!r} does not take these settings ({err})") from err


def task_constructor_settings(task_name: str, task: Task, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` plus the labels the task ended up with (collected from the training file when not given), so
    that the same task, label order included, can be rebuilt for evaluation and prediction."""
    labels = getattr(task, "labels", None)
    builder = type(task).__init__
    if labels is not None and "labels" in inspect.signature(builder).parameters:
        return settings | {"labels": list(labels)}
    return dict(settings)


def part_files(data: DataArgs, required: tuple[str, ...] = ("train", "dev")) -> dict[str, Any]:
    """Where each part is read from: ``data.<part>_file`` when given, else the task's layout in the data folder."""
    given = {part: getattr(data, f"{part}_file") for part in PARTS if getattr(data, f"{part}_file")}
    spec = task_spec(data.task)
    if not spec.layout.parts:  # custom: files only
        missing = [part for part in required if part not in given]
        if missing:
            flags = " and ".join(f"--data.{part}_file" for part in missing)
            raise RunConfigError(f"task {spec.name!r} reads your own files: set {flags}")
        return given
    try:
        found = task_files(spec.name, data.data_dir, data.split)
    except ValueError as err:
        if isinstance(err, DataError) and given.keys() >= set(required):
            found = {}
        elif isinstance(err, DataError):
            raise
        else:
            raise RunConfigError(f"--data.split: {err}") from err
    return found | given


def subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A random subset of ``size`` examples in their file order (all of them when ``size`` is None or larger)."""
    if size is None or size >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]


def read_part(task: Task, path: Any) -> list[Example]:
    if isinstance(path, (str, Path)):
        return task.read(path)
    return task.read(tuple(path))  # several files read together (C3's m + d)


def load_examples(data: DataArgs, parts: tuple[str, ...] = PARTS) -> tuple[Task, dict[str, list[Example]]]:
    """The task and its examples per part (test only when it exists), subsets applied. The training file is read
    first, so a task that collects its labels from data gets them from there. Raises ``DataError`` (file:line) or
    ``RunConfigError``."""
    task = build_task(data)
    files = part_files(data)
    examples: dict[str, list[Example]] = {}
    for part in parts:
        if part not in files:
            continue
        read = read_part(task, files[part])
        if part != "test" and not read:
            raise DataError(files[part], None, f"no {part} examples")
        limit = getattr(data, f"max_{part}_examples")
        examples[part] = subset(read, limit, data.sample_seed)
    if "dev" in examples and any(e.label is None for e in examples["dev"]):
        bad = next(e for e in examples["dev"] if e.label is None)
        raise DataError(bad.source or files["dev"], None, "dev examples need labels to select the best checkpoint")
    return task, examples
