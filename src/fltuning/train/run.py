"""``train(config)``: one training run, from files to a run folder with the best model, its scores and predictions.

    <run>/
      config.yaml        the effective configuration (defaults + YAML + flags)
      run.json           versions, git revision, seed, command line, processes, device and hardware
      parameters.json    what trains: the method's count, the head's, % of the model and of its layers
      metrics.jsonl      one JSON line per logged training step and per evaluation
      checkpoints/       step-N folders (atomic; the newest and the best are kept) for --output.resume auto
      adapter/           the best model: method tensors + head + task.json (fltune evaluate / predict / export)
      results.json       best step, dev and test scores of the best model
      predictions/       the test set's submission file, in the CLUE format

Everything that can be wrong with the input (config, data files, method settings) is checked before the run folder
is created; an existing run folder is only ever continued (``--output.resume auto``), never overwritten.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import fltuning
from fltuning.tasks.base import Example, Task
from fltuning.tasks.registry import task_spec
from fltuning.train import checkpoint as ckpt
from fltuning.train.adapter import save_adapter
from fltuning.train.build import build_model, parameter_report
from fltuning.train.config import RunConfig, RunConfigError, load_config
from fltuning.train.data import load_examples, task_constructor_settings
from fltuning.train.loop import Trainer, predict

RESULTS = "results.json"


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "peft": peft.__version__,
        "fltuning": fltuning.__version__,
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows of it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return model or platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    """What the run computes on, for reading its timings: the GPU's name, or the CPU's and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"


def git_revision() -> str | None:
    """The commit of the fltuning source tree, with "+dirty" for uncommitted changes (None outside git)."""
    source = Path(fltuning.__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def max_length_of(config: RunConfig) -> int:
    return config.data.max_length or task_spec(config.data.task).max_length


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def submission_path(folder: Path, task_name: str) -> Path:
    return folder / f"{task_name.split('/')[-1]}_predict.json"


def write_submission(task: Task, examples: list[Example], features: list[dict], predictions: list, path: Path) -> Path:
    """The CLUE submission file: one JSON line per example in file order; CMRC2018: one object id -> answer.
    Written to a temporary name and renamed, so a crash never leaves half a file."""
    records = task.submission(examples, features, predictions)
    if task.kind == "mrc":
        text = json.dumps({r["id"]: r["answer"] for r in records}, ensure_ascii=False) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_run_folder(config: RunConfig, run_dir: Path) -> bool:
    """Whether to resume. Raises ``RunConfigError`` when the folder holds a run that may not be touched: any run
    without ``--output.resume auto``, or one whose settings differ from ``config``."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunConfigError(f"--output.dir {run_dir} exists and is not a run folder; choose an empty folder")
        return False
    if config.output.resume != "auto":
        raise RunConfigError(
            f"run folder {run_dir} already holds a run; continue it with --output.resume auto, "
            "or choose another --output.dir"
        )
    before, now = load_config(saved).to_dict(), config.to_dict()
    movable = {("data", "data_dir")}  # the same data may live elsewhere now
    differs = [
        f"{section}.{key}: {before[section].get(key)!r} in the run, {now[section].get(key)!r} now"
        for section in now
        if section != "output"
        for key in sorted(set(now[section]) | set(before[section]))
        if before[section].get(key) != now[section].get(key) and (section, key) not in movable
    ]
    if differs:
        raise RunConfigError(f"cannot resume {run_dir} with other settings: " + "; ".join(differs))
    return True


def train(config: RunConfig, callback: Callable[[str, Trainer], None] | None = None) -> dict[str, Any]:
    """Run training as configured; returns (and writes to ``results.json``) the best model's scores.

    Raises ``RunConfigError`` / ``DataError`` / ``MethodError`` for bad input (nothing written then),
    ``TrainingStopped`` after a requested stop (resumable), ``TrainingDiverged`` on a non-finite loss."""
    run_dir = config.run_dir()
    resume = check_run_folder(config, run_dir)
    if resume and (run_dir / RESULTS).is_file():
        print(f"{run_dir}: training already finished; its results:", file=sys.stderr)
        return json.loads((run_dir / RESULTS).read_text())
    task, examples = load_examples(config.data)
    # With no GPU, cpu=True is what makes Accelerate start a gloo process group under torchrun.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(config.train.seed)
    model, method, tokenizer = build_model(config.model, config.method, task)
    max_length = max_length_of(config)
    features = {part: task.encode(items, tokenizer, max_length) for part, items in examples.items()}
    report = parameter_report(model, method)

    found = ckpt.list_checkpoints(run_dir, resumable=True) if resume else []
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale(run_dir)
        if not found:
            (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
            (run_dir / ckpt.CHECKPOINTS).mkdir(exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("")
        write_json(run_dir / "parameters.json", report.to_dict())
        write_json(
            run_dir / "run.json",
            {
                "versions": versions(),
                "git_revision": git_revision(),
                "seed": config.train.seed,
                "command": sys.argv,
                "processes": accelerator.num_processes,
                "device": str(accelerator.device),
                "hardware": hardware(accelerator.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "resumed_from": str(found[-1][1]) if found else None,
            },
        )
        print(report, file=sys.stderr)
    accelerator.wait_for_everyone()

    trainer = Trainer(config, task, model, method, features, examples["dev"], run_dir, accelerator, callback)
    if found:
        trainer.resume_from(found[-1][1])
    else:
        torch.manual_seed(config.train.seed + accelerator.process_index)  # dropout differs per process
    position = trainer.fit()

    best = run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(position.best_step)
    trainer.load_trained_tensors(ckpt.load_tensors(best / "model.safetensors"))
    results: dict[str, Any] = {
        "task": task_spec(config.data.task).name,
        "method": method.name,
        "method_settings": method.settings(),
        "best_step": position.best_step,
        "steps": position.step,
        "train_seconds": round(position.train_seconds, 3),
        "parameters": report.to_dict(),
        "dev": trainer.evaluate_dev(),
    }
    test = examples.get("test")
    batch_size = config.train.eval_batch_size or 2 * config.train.batch_size
    if test:
        predictions = predict(trainer.inner, task, features["test"], batch_size, accelerator)
        if all(e.label is not None for e in test):
            results["test"] = task.score(test, features["test"], predictions)
        if config.output.predict and accelerator.is_main_process:
            path = submission_path(run_dir / "predictions", results["task"])
            results["prediction_file"] = str(write_submission(task, test, features["test"], predictions, path))
    if accelerator.is_main_process:
        task_info = {
            "task": results["task"],
            "task_settings": task_constructor_settings(results["task"], task, config.data.task_settings),
            "max_length": max_length,
            "pooling": trainer.inner.pooling,
        }
        save_adapter(run_dir / "adapter", trainer.inner, method, task_info, config.model.name)
        write_json(run_dir / RESULTS, results)
    accelerator.wait_for_everyone()
    return results
