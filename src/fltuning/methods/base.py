"""The one interface every tuning method sits behind.

A method is chosen by name plus its own settings (``build_method("fl", num_units=160)``). The training code only
calls what is defined here, so it never asks which method it runs:

- ``apply(backbone)`` freezes what the method does not train and injects what it does; it returns the module to
  train (the same object or a wrapper).
- ``trainable_state_dict`` / ``load_trainable_state_dict`` move exactly the tensors the method trains, with stable
  names, so ``save`` / ``load`` write and read only those (safetensors, never pickle).
- ``mergeable`` and ``merge_and_unload`` say whether the method folds into a plain transformers model.
- ``for_budget`` picks the method's size so its trainable count matches a parameter budget.

Task heads are not part of a method: the task model keeps its head trainable and saves it next to the method's file.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

METHOD_CONFIG_NAME = "method_config.json"
METHOD_WEIGHTS_NAME = "method_model.safetensors"


class MethodError(ValueError):
    """A tuning method was misconfigured, or its saved files do not fit the model they are loaded into."""


class TuningMethod(ABC):
    """A tuning method with its settings. Subclasses are dataclass-like: ``settings()`` returns their constructor
    keyword arguments so that ``build_method(name, **settings)`` rebuilds an equal method."""

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False

    @abstractmethod
    def apply(self, backbone: nn.Module) -> nn.Module:
        """Freeze the backbone's own weights (unless the method trains them) and add the method's parameters.

        Returns the module to train. Raises ``MethodError`` if the backbone cannot host the method."""

    @abstractmethod
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this method trains in ``model`` (the module ``apply`` returned), keyed by stable names."""

    @abstractmethod
    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into ``model``'s method tensors. Raises ``MethodError`` naming missing, unexpected or
        mis-shaped tensors."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The constructor keyword arguments of this method (JSON-serialisable)."""

    @classmethod
    @abstractmethod
    def for_budget(cls, config: PretrainedConfig, budget: int, **settings: Any) -> TuningMethod:
        """A method of this kind whose trainable count on a backbone with ``config`` is as close as possible to
        ``budget`` parameters (the other settings fixed by ``settings``)."""

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """Fold the method into a plain transformers model and return it. Raises ``MethodError`` when the method
        does not merge."""
        raise MethodError(f"method {self.name!r} does not merge into the base model; export it as an adapter instead")

    def num_trainable(self, model: nn.Module) -> int:
        """Number of scalar parameters the method trains in ``model`` (the task head not included)."""
        return sum(t.numel() for t in self.trainable_state_dict(model).values())

    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Write ``method_config.json`` and ``method_model.safetensors`` (trained tensors only) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict(model).items()}
        save_file(state, str(directory / METHOD_WEIGHTS_NAME))
        meta = {"method": self.name, "settings": self.settings()}
        (directory / METHOD_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def load(self, model: nn.Module, directory: str | Path) -> None:
        """Load tensors written by ``save`` into ``model`` (after ``apply``). Raises ``MethodError`` on a missing or
        corrupt file, or tensors that do not fit."""
        path = Path(directory) / METHOD_WEIGHTS_NAME
        if not path.is_file():
            raise MethodError(f"{path} is missing: not a folder written by {self.name!r}.save()")
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises several error types for a damaged file
            raise MethodError(f"{path} is not a readable safetensors file ({err})") from err
        self.load_trainable_state_dict(model, state)


_REGISTRY: dict[str, type[TuningMethod]] = {}


def register_method(cls: type[TuningMethod]) -> type[TuningMethod]:
    """Class decorator: make ``cls`` available to ``build_method`` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    from fltuning import methods  # noqa: F401  (importing the package registers every method)

    return sorted(_REGISTRY)


def method_class(name: str) -> type[TuningMethod]:
    from fltuning import methods  # noqa: F401

    if name not in _REGISTRY:
        raise MethodError(f"unknown tuning method {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, **settings: Any) -> TuningMethod:
    """The method called ``name`` with ``settings`` (its constructor keyword arguments)."""
    cls = method_class(name)
    try:
        return cls(**settings)
    except TypeError as err:
        raise MethodError(f"bad settings for method {name!r}: {err}") from err


def load_method_config(directory: str | Path) -> TuningMethod:
    """Rebuild the method described by ``directory/method_config.json``."""
    path = Path(directory) / METHOD_CONFIG_NAME
    if not path.is_file():
        raise MethodError(f"{path} is missing")
    try:
        meta = json.loads(path.read_text())
        return build_method(meta["method"], **meta.get("settings", {}))
    except (json.JSONDecodeError, KeyError) as err:
        raise MethodError(f"{path} is not a valid method config ({err})") from err


def copy_named_tensors(method: str, targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state[name]`` into ``targets[name]`` for every name. Raises ``MethodError`` naming missing, unexpected
    and mis-shaped tensors (e.g. a file saved for another model shape); nothing is copied then."""
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
    if missing or unexpected:
        raise MethodError(
            f"{method} state does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, target in targets.items():
        if state[name].shape != target.shape:
            raise MethodError(
                f"{method} tensor {name!r}: saved shape {tuple(state[name].shape)}, this model needs "
                f"{tuple(target.shape)} (saved for another model shape or size?)"
            )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(state[name])


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
