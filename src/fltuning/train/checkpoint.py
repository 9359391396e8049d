"""Training checkpoints: only what trains, in safetensors, written atomically, found again by ``--resume auto``.

A checkpoint is a folder ``<run>/checkpoints/step-<N>/``::

    model.safetensors      the trained tensors: the method's (``method.trainable_state_dict``) as ``method.*``,
                           the task head's as ``head.*``
    optimizer.safetensors  the optimizer's per-parameter tensors (Adam moments, step counts)
    optimizer.json         the optimizer's param groups (learning rates, betas, ...)
    rng-<rank>.safetensors each process's torch RNG state (dropout)
    state.json             the training position (epoch, batch, step), scheduler state, best score so far
    COMPLETE.json          written last: every other file with its size

A *best-only* checkpoint (``--output.checkpoint_every N`` above 1: a new best dev score between resumable
checkpoints) holds model.safetensors, state.json and COMPLETE.json alone: the final model is loaded from it, but a
run never resumes from it.

It is written into ``<run>/checkpoints/.tmp-step-<N>/`` and renamed into place only when complete (same
filesystem, so the rename is atomic); a folder without ``COMPLETE.json`` or whose sizes disagree is never resumed
from, and stale ``.tmp-*`` folders are removed. Nothing is pickled: loading runs no code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
MANIFEST = "COMPLETE.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the folder."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temporary_folder(final: Path) -> Path:
    """The staging folder of ``final``: beside it, so that the final rename stays on one filesystem."""
    return final.parent / f".tmp-{final.name}"


def write_atomically(final: Path, write: Callable[[Path], None], prepared: bool = False) -> Path:
    """Call ``write(tmp)`` to fill the staging folder of ``final`` (a fresh one unless ``prepared``: other processes
    already wrote into it), add the manifest, then rename it to ``final``. If anything raises, the staging folder is
    removed and an existing ``final`` is untouched."""
    tmp = temporary_folder(final)
    if not prepared:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        write(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            _fsync(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        _fsync(tmp / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` has its manifest and every file it lists, with the listed size."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def is_resumable(folder: Path) -> bool:
    """Whether a complete checkpoint holds the optimizer state a run resumes from (not a best-only one)."""
    return (folder / "optimizer.json").is_file()


def list_checkpoints(run_dir: Path, resumable: bool = False) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (only those a run can resume from, if ``resumable``), oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and folder.is_dir() and is_complete(folder) and (not resumable or is_resumable(folder)):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def remove_stale(run_dir: Path) -> None:
    """Delete half-written checkpoint folders left by a crash."""
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for folder in root.glob(".tmp-*"):
            shutil.rmtree(folder, ignore_errors=True)


def rotate(run_dir: Path, keep: int, protect: set[int]) -> None:
    """Delete every complete checkpoint but the ``keep`` newest resumable ones and those whose step is in
    ``protect`` (the best and the current one)."""
    resumable = list_checkpoints(run_dir, resumable=True)
    kept = {step for step, _ in resumable[len(resumable) - keep :]} if keep > 0 else set()
    for step, folder in list_checkpoints(run_dir):
        if step not in protect and step not in kept:
            shutil.rmtree(folder, ignore_errors=True)


# -- what goes in the files ---------------------------------------------------------------------------------------


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for a damaged file
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err


def optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Split ``optimizer.state_dict()`` into its tensors (safetensors) and its param groups (JSON)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_tensors(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"]}, indent=1) + "\n")


def optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_tensors(folder / "optimizer.safetensors")
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{folder}: optimizer state does not fit this run ({err})") from err


def rng_to_file(folder: Path, rank: int) -> None:
    save_tensors({"torch": torch.get_rng_state()}, folder / f"rng-{rank}.safetensors")


def rng_from_file(folder: Path, rank: int) -> None:
    path = folder / f"rng-{rank}.safetensors"
    if path.is_file():  # a run resumed with another number of processes keeps its fresh per-rank seed
        torch.set_rng_state(load_tensors(path)["torch"])


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}/state.json is missing or damaged ({err})") from err
