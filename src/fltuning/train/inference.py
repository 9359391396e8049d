"""What a trained model is for: ``evaluate`` it, ``predict`` a test file into a submission, ``export`` it.

Each takes a run folder (its ``adapter/`` is used) or an adapter folder. Data comes from the run's own
``config.yaml`` unless ``data`` settings say otherwise (another file, another data folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from fltuning.train import checkpoint as ckpt
from fltuning.train.adapter import HEAD_FILE, TASK_FILE, load_adapter, read_task_info
from fltuning.train.config import DataArgs, RunConfigError, load_config
from fltuning.train.data import part_files, read_part, subset
from fltuning.train.loop import predict
from fltuning.train.run import submission_path, write_json, write_submission


def adapter_folder(path: str | Path) -> Path:
    """``path`` itself if it is an adapter folder, else ``path/adapter`` (a run folder)."""
    path = Path(path)
    if (path / TASK_FILE).is_file():
        return path
    if (path / "adapter" / TASK_FILE).is_file():
        return path / "adapter"
    if (path / "config.yaml").is_file():
        raise ckpt.CheckpointError(f"{path} holds a run that has not finished (no {path / 'adapter'}); resume it")
    raise ckpt.CheckpointError(f"{path} is neither a run folder nor an adapter folder (no {TASK_FILE})")


def data_args(path: Path, overrides: dict[str, Any]) -> DataArgs:
    """The run's data settings (from its ``config.yaml`` when there is one) with ``data.*`` overrides applied."""
    run_config = path / "config.yaml"
    base = run_config if run_config.is_file() else None
    info = read_task_info(adapter_folder(path))
    extra = {k: v for k, v in overrides.items() if k.startswith("data.")}
    if base is None:
        extra = {"data.task": info["task"]} | extra
    unknown = [k for k in overrides if not k.startswith(("data.", "model.name", "train.eval_batch_size"))]
    if unknown:
        raise RunConfigError(f"--{unknown[0]}: evaluate / predict take only --data.*, --model.name, --train.*batch*")
    return load_config(base, extra).data


def _examples(task, data: DataArgs, part: str, input_file: str | None = None) -> list:
    if input_file is not None:
        return task.read(input_file)
    files = part_files(data, required=(part,))
    if part not in files:
        raise RunConfigError(f"no {part} file for task {data.task!r}; pass --data.{part}_file (or --input)")
    return subset(read_part(task, files[part]), getattr(data, f"max_{part}_examples"), data.sample_seed)


def evaluate(path: str | Path, split: str = "dev", overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Scores of the trained model on ``split`` (dev, or a labelled test set)."""
    overrides = overrides or {}
    path = Path(path)
    model, _, task, tokenizer, info = load_adapter(adapter_folder(path), overrides.get("model.name"))
    examples = _examples(task, data_args(path, overrides), split)
    if any(e.label is None for e in examples):
        raise RunConfigError(f"the {split} set has no labels to score; use `fltune predict` for it")
    features = task.encode(examples, tokenizer, info["max_length"])
    predictions = predict(model, task, features, int(overrides.get("train.eval_batch_size", 64)))
    return task.score(examples, features, predictions)


def predict_file(
    path: str | Path,
    input_file: str | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the submission file for the test set (or ``input_file``); refuses to replace an existing file unless
    ``overwrite``."""
    overrides = overrides or {}
    path = Path(path)
    folder = adapter_folder(path)
    model, _, task, tokenizer, info = load_adapter(folder, overrides.get("model.name"))
    target = Path(output) if output else submission_path(folder.parent / "predictions", info["task"])
    if target.exists() and not overwrite:
        raise RunConfigError(f"{target} exists; pass --output elsewhere or --overwrite")
    examples = _examples(task, data_args(path, overrides), "test", input_file)
    features = task.encode(examples, tokenizer, info["max_length"])
    predictions = predict(model, task, features, int(overrides.get("train.eval_batch_size", 64)))
    return write_submission(task, examples, features, predictions, target)


def export(path: str | Path, out: str | Path, merged: bool = False, model_name: str | None = None) -> Path:
    """Write the adapter folder (``merged=False``), or the merged plain transformers checkpoint with the tokenizer,
    the task head and ``task.json`` beside it. ``out`` must not exist or be empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RunConfigError(f"{out} exists and is not empty; export into a new folder")
    folder = adapter_folder(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not merged:
        read_task_info(folder)
        files = [p for p in folder.iterdir() if p.is_file() and p.name != ckpt.MANIFEST]
        return ckpt.write_atomically(out, lambda tmp: [shutil.copy2(p, tmp / p.name) for p in files])
    model, method, task, tokenizer, info = load_adapter(folder, model_name)
    plain = method.merge_and_unload(model.backbone)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        write_json(tmp / TASK_FILE, info | {"merged_from": method.settings() | {"method": method.name}})

    return ckpt.write_atomically(out, write)
