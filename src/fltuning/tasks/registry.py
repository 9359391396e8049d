"""Task names -> Task instances and where their files are.

    task = get_task("fewclue/tnews")
    files = task_files("fewclue/tnews", data_dir, split=0)   # {"train": .../train_0.json, "dev": ..., "test": ...}
    train = task.read(files["train"])

One row per task below: how to build it, the folder it lives in under the data directory (the first that exists of
the names listed, e.g. ``tnews`` or CLUE's ``tnews_public``), its files per part, and the paper's ``max_length``.
A file name may hold ``{split}``, filled from the ``split`` argument:

- FewCLUE (``fewclue/<task>/``): split 0..4 -> ``train_{k}.json`` / ``dev_{k}.json``; split "all" ->
  ``train_few_all.json`` / ``dev_few_all.json``; test is ``test_public.json`` (the public test set, labelled).
- CLUE (``<task>/``): ``train.json`` / ``dev.json`` / ``test.json``. OCNLI's train is ``train.{split}.json`` with
  split 50k (the default, the paper's), 30k, 10k or 3k. CMRC2018 trains on ``cmrc2018_train.json``, or on the trial
  set with split "trial". C3 reads two files per part (m + d), given as a tuple that ``C3Task.read`` accepts.

The test part is optional (absent from the result when its file is missing); a missing train or dev file raises
``DataError`` naming the path and the expected layout. The data directory is the ``data_dir`` argument, else the
environment variable ``FLTUNING_DATA_DIR``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fltuning.tasks.base import DataError, Task
from fltuning.tasks.classification import ClassificationTask, CSLTask, WSCTask
from fltuning.tasks.custom import CustomClassificationTask
from fltuning.tasks.multiple_choice import C3Task, CHIDTask

DATA_DIR_ENV = "FLTUNING_DATA_DIR"

TNEWS_LABELS = [
    "100",
    "101",
    "102",
    "103",
    "104",
    "106",
    "107",
    "108",
    "109",
    "110",
    "112",
    "113",
    "114",
    "115",
    "116",
]
IFLYTEK_LABELS = [str(i) for i in range(119)]
NLI_LABELS = ["entailment", "neutral", "contradiction"]
BINARY = ["0", "1"]

FileName = str | tuple[str, ...]  # one file, or several read together (C3's m + d)


@dataclass(frozen=True)
class Layout:
    """Where a task's files are: ``folders`` (first existing wins) and, per part, alternative file names."""

    folders: tuple[str, ...]
    parts: dict[str, tuple[FileName, ...]]
    splits: dict[Any, str] = field(default_factory=dict)  # the ``split`` argument -> the ``{split}`` text
    default_split: Any = None
    optional: tuple[str, ...] = ("test",)

    def describe(self) -> str:
        parts = ", ".join(f"{part}: {' or '.join(map(_show, names))}" for part, names in self.parts.items())
        splits = f"; split in {sorted(set(map(str, self.splits)))}" if self.splits else ""
        return f"<data_dir>/{' or '.join(self.folders)}/ with {parts}{splits}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[..., Task]
    layout: Layout
    max_length: int  # the paper's maxlen for the task (FewCLUE tasks: the full task's)


def _show(name: FileName) -> str:
    return name if isinstance(name, str) else "+".join(name)


def _fewclue(task: str) -> Layout:
    splits: dict[Any, str] = {k: str(k) for k in range(5)} | {str(k): str(k) for k in range(5)} | {"all": "few_all"}
    parts = {"train": ("train_{split}.json",), "dev": ("dev_{split}.json",), "test": ("test_public.json",)}
    return Layout(folders=(f"fewclue/{task}",), parts=parts, splits=splits)


def _clue(*folders: str, test: tuple[str, ...] = ("test.json",)) -> Layout:
    return Layout(folders=folders, parts={"train": ("train.json",), "dev": ("dev.json",), "test": test})


def _lazy(module: str, cls: str) -> Callable[..., Task]:
    """A factory that imports ``fltuning.tasks.<module>`` only when the task is built."""

    def build(**settings: Any) -> Task:
        return getattr(importlib.import_module(f"fltuning.tasks.{module}"), cls)(**settings)

    return build


def _single(name: str, text: str, labels: list[str] | None) -> Callable[..., Task]:
    return lambda **kw: ClassificationTask(**{"name": name, "text_field": text, "labels": labels, **kw})


def _pair(name: str, labels: list[str], skip: tuple[str, ...] = ()) -> Callable[..., Task]:
    return lambda **kw: ClassificationTask(
        **{
            "name": name,
            "text_field": "sentence1",
            "text_pair_field": "sentence2",
            "labels": labels,
            "skip_labels": skip,
        }
        | kw
    )


_C3_PARTS = {  # nlpdata/c3 names, then CLUE's c3_public names
    part: ((f"c3-m-{part}.json", f"c3-d-{part}.json"), (f"m-{part}.json", f"d-{part}.json"))
    for part in ("train", "dev", "test")
}
_C3_PARTS["test"] = _C3_PARTS["test"] + ("test1.1.json",)

_SPECS = [
    # FewCLUE: 5 few-shot splits + their union; test_public is the labelled public test set.
    TaskSpec("fewclue/eprstmt", _single("eprstmt", "sentence", ["Negative", "Positive"]), _fewclue("eprstmt"), 128),
    TaskSpec("fewclue/tnews", _single("tnews", "sentence", TNEWS_LABELS), _fewclue("tnews"), 128),
    TaskSpec("fewclue/iflytek", _single("iflytek", "sentence", IFLYTEK_LABELS), _fewclue("iflytek"), 128),
    TaskSpec("fewclue/csldcp", _single("csldcp", "content", None), _fewclue("csldcp"), 128),
    TaskSpec("fewclue/ocnli", _pair("ocnli", NLI_LABELS, skip=("-",)), _fewclue("ocnli"), 128),
    TaskSpec("fewclue/bustm", _pair("bustm", BINARY), _fewclue("bustm"), 128),
    TaskSpec("fewclue/csl", lambda **kw: CSLTask(**kw), _fewclue("csl"), 128),
    TaskSpec("fewclue/cluewsc", lambda **kw: WSCTask(**{"name": "cluewsc", **kw}), _fewclue("cluewsc"), 128),
    TaskSpec("fewclue/chid", lambda **kw: CHIDTask(**kw), _fewclue("chid"), 64),
    # CLUE, full data.
    TaskSpec("afqmc", _pair("afqmc", BINARY), _clue("afqmc", "afqmc_public"), 128),
    TaskSpec(
        "afqmc_dataclue",
        _pair("afqmc_dataclue", BINARY),
        _clue("afqmc_dataclue", test=("test_public.json", "test.json")),
        128,
    ),
    TaskSpec("tnews", _single("tnews", "sentence", TNEWS_LABELS), _clue("tnews", "tnews_public"), 128),
    TaskSpec("iflytek", _single("iflytek", "sentence", IFLYTEK_LABELS), _clue("iflytek", "iflytek_public"), 128),
    TaskSpec("cmnli", _pair("cmnli", NLI_LABELS, skip=("-",)), _clue("cmnli", "cmnli_public"), 128),
    TaskSpec(
        "ocnli",
        _pair("ocnli", NLI_LABELS, skip=("-",)),
        Layout(
            folders=("ocnli", "ocnli_public"),
            parts={"train": ("train.{split}.json",), "dev": ("dev.json",), "test": ("test.json",)},
            splits={"50k": "50k", "30k": "30k", "10k": "10k", "3k": "3k"},
            default_split="50k",
        ),
        128,
    ),
    TaskSpec("csl", lambda **kw: CSLTask(**kw), _clue("csl", "csl_public"), 128),
    TaskSpec("cluewsc2020", lambda **kw: WSCTask(**kw), _clue("cluewsc2020", "cluewsc2020_public", "wsc"), 128),
    TaskSpec("c3", lambda **kw: C3Task(**kw), Layout(folders=("c3", "c3_public"), parts=_C3_PARTS), 512),
    TaskSpec(
        "chid", lambda **kw: CHIDTask(**kw), _clue("chid", "chid_public", test=("test.json", "test1.1.json")), 64
    ),
    TaskSpec(
        "cluener2020",
        _lazy("ner", "NERTask"),
        Layout(
            folders=("cluener2020", "cluener", "cluener_public"),
            parts={
                "train": ("train.jsonl", "train.json"),
                "dev": ("dev.jsonl", "dev.json"),
                "test": ("test.jsonl", "test.json"),
            },
        ),
        256,
    ),
    TaskSpec(
        "cmrc2018",
        _lazy("mrc", "MRCTask"),
        Layout(
            folders=("cmrc2018", "cmrc2018_public"),
            parts={
                "train": ("cmrc2018_{split}.json", "{split}.json"),
                "dev": ("cmrc2018_dev.json", "dev.json"),
                "test": ("cmrc2018_test.json", "test.json"),
            },
            splits={"train": "train", "trial": "trial"},
            default_split="train",
        ),
        512,
    ),
    # Bring your own data: settings name the fields; files are passed directly, not found by layout.
    TaskSpec("custom", lambda **kw: CustomClassificationTask(**kw), Layout(folders=(), parts={}), 128),
]
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
ALIASES = {"wsc": "cluewsc2020", "cluener": "cluener2020", "fewclue/wsc": "fewclue/cluewsc"}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_spec(name: str) -> TaskSpec:
    """The registry row of ``name``. Raises ``KeyError`` listing the known names."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TASKS[key]


def get_task(name: str, **settings: Any) -> Task:
    """A new Task for ``name``; ``settings`` go to its constructor (e.g. ``labels=``, or the custom task's
    ``text_field=`` / ``label_field=``)."""
    return task_spec(name).build(**settings)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else ``$FLTUNING_DATA_DIR``. Raises ``DataError`` when neither is set or it is not a folder."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise DataError(DATA_DIR_ENV, None, f"no data directory: pass data_dir or set {DATA_DIR_ENV}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(path, None, "data directory not found")
    return path


def task_files(name: str, data_dir: str | Path | None = None, split: Any = None) -> dict[str, Path | tuple[Path, ...]]:
    """The files of task ``name``: ``{"train": path, "dev": path, "test": path}`` (test only when present; C3's
    parts are tuples of paths). Raises ``DataError`` naming the missing path and the expected layout, and
    ``ValueError`` for a ``split`` the task does not have."""
    spec = task_spec(name)
    layout = spec.layout
    if not layout.parts:
        raise ValueError(f"task {spec.name!r} has no file layout: pass its files to task.read() directly")
    if split is None:
        split = layout.default_split
    if layout.splits:
        if split not in layout.splits:
            raise ValueError(
                f"task {spec.name!r} needs split= one of {sorted(set(map(str, layout.splits)))}, got {split!r}"
            )
        fill = layout.splits[split]
    elif split is not None:
        raise ValueError(f"task {spec.name!r} has no splits (got split={split!r})")
    else:
        fill = ""
    root = resolve_data_dir(data_dir)
    folder = next((root / f for f in layout.folders if (root / f).is_dir()), None)
    if folder is None:
        raise DataError(root / layout.folders[0], None, f"folder not found; expected {layout.describe()}")
    files: dict[str, Path | tuple[Path, ...]] = {}
    for part, names in layout.parts.items():
        found = None
        for candidate in names:
            paths = tuple(
                folder / n.format(split=fill) for n in ((candidate,) if isinstance(candidate, str) else candidate)
            )
            if all(p.is_file() for p in paths):
                found = paths[0] if isinstance(candidate, str) else paths
                break
        if found is not None:
            files[part] = found
        elif part not in layout.optional:
            first = names[0] if isinstance(names[0], str) else names[0][0]
            present = sorted(p.name for p in folder.iterdir())[:20]
            raise DataError(
                folder / first.format(split=fill),
                None,
                f"file not found; expected {layout.describe()} (found in {folder}: {present})",
            )
    return files
