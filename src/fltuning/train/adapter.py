"""The trained-model folder a run leaves behind (``<run>/adapter/``), and loading it back.

    adapter/
      method_config.json, method_model.safetensors   the tuning method and its trained tensors (methods.base)
      head.safetensors                                the task head
      task.json                                       task name + settings (labels included), max_length, pooling,
                                                      the base model and its shape fingerprint

The folder is self-contained apart from the base model, which is named, not copied; an adapter is refused by a base
model of another shape (``AdapterMismatchError``), before any tensor is touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from fltuning.methods.base import METHOD_CONFIG_NAME, TuningMethod, load_method_config
from fltuning.tasks.base import Task
from fltuning.tasks.model import TaskModel
from fltuning.tasks.registry import get_task
from fltuning.train.build import fingerprint, load_backbone
from fltuning.train.checkpoint import CheckpointError, load_tensors, write_atomically
from fltuning.train.config import ModelArgs

TASK_FILE = "task.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """An adapter folder does not fit the model or data it is used with; the message says what differs."""


def save_adapter(
    folder: Path, model: TaskModel, method: TuningMethod, task_info: dict[str, Any], model_name: str
) -> Path:
    """Write the adapter folder atomically: method files, head, ``task.json``."""
    info = {"format_version": FORMAT_VERSION, **task_info, "base_model": model_name}
    info["fingerprint"] = fingerprint(model.backbone.config)

    def write(tmp: Path) -> None:
        method.save(model.backbone, tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        (tmp / TASK_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return write_atomically(folder, write)


def read_task_info(folder: Path) -> dict[str, Any]:
    path = folder / TASK_FILE
    if not (folder / METHOD_CONFIG_NAME).is_file() or not path.is_file():
        raise CheckpointError(
            f"{folder} is not an adapter folder (needs {METHOD_CONFIG_NAME} and {TASK_FILE}; a run folder keeps "
            "its adapter in <run>/adapter)"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path} is damaged ({err})") from err
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer fltuning (format {info['format_version']}); upgrade")
    return info


def load_adapter(
    folder: str | Path, model_name: str | None = None
) -> tuple[TaskModel, TuningMethod, Task, PreTrainedTokenizerBase, dict[str, Any]]:
    """The trained task model in ``folder`` on its base model (or ``model_name``), with its task and tokenizer.

    Raises ``AdapterMismatchError`` when the base model's shape differs from the one the adapter was trained on,
    ``CheckpointError`` for a damaged folder."""
    folder = Path(folder)
    info = read_task_info(folder)
    task = get_task(info["task"], **info.get("task_settings", {}))
    name = model_name or info["base_model"]
    backbone, tokenizer, _ = load_backbone(ModelArgs(name=name))
    have, want = fingerprint(backbone.config), info.get("fingerprint", {})
    differs = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if differs:
        shown = ", ".join(f"{k} {a} (adapter) vs {b} (model)" for k, (a, b) in differs.items())
        raise AdapterMismatchError(
            f"{folder} was trained on {info['base_model']!r}, which does not match {name!r}: {shown}"
        )
    method = load_method_config(folder)
    model = TaskModel(method.apply(backbone), task.build_head(backbone.config), info["pooling"])
    method.load(model.backbone, folder)
    head = load_tensors(folder / HEAD_FILE)
    try:
        model.head.load_state_dict(head)
    except RuntimeError as err:
        raise AdapterMismatchError(f"{folder / HEAD_FILE} does not fit the task head ({err})") from err
    model.eval()
    return model, method, task, tokenizer, info
