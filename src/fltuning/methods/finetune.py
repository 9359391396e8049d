"""Full fine-tuning: every weight of the backbone trains. ``save`` writes a plain transformers checkpoint
(``config.json`` + ``model.safetensors`` via ``save_pretrained``) next to ``method_config.json``, so the folder also
reloads with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from fltuning.methods.base import METHOD_CONFIG_NAME, MethodError, TuningMethod, copy_named_tensors, register_method

CHECKPOINT_NAME = "model.safetensors"  # what save_pretrained writes (or its index, when sharded)
CHECKPOINT_INDEX_NAME = "model.safetensors.index.json"


@register_method
class FullFineTuning(TuningMethod):
    """All backbone weights train. Nothing to merge: ``merge_and_unload`` returns the model itself."""

    name = "finetune"
    mergeable = True

    def apply(self, backbone: nn.Module) -> nn.Module:
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole backbone state (parameters and persistent buffers), keyed as in ``model.state_dict()``."""
        return model.state_dict()

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        copy_named_tensors(self.name, self.trainable_state_dict(model), state)

    def num_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def settings(self) -> dict[str, Any]:
        return {}

    @classmethod
    def for_budget(cls, config: PretrainedConfig, budget: int, **settings: Any) -> FullFineTuning:
        """Full fine-tuning has no size: the budget is ignored."""
        return cls(**settings)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Write ``method_config.json`` and the backbone as a transformers checkpoint (``save_pretrained``,
        safetensors). Raises ``MethodError`` for a model that is not a transformers ``PreTrainedModel``."""
        if not isinstance(model, PreTrainedModel):
            raise MethodError(f"finetune saves with save_pretrained; {type(model).__name__} is not a PreTrainedModel")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        meta = {"method": self.name, "settings": self.settings()}
        (directory / METHOD_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def load(self, model: nn.Module, directory: str | Path) -> None:
        """Load the checkpoint ``save`` wrote (one file or shards) into ``model``. Raises ``MethodError`` on a
        missing or unreadable file, or tensors that do not fit."""
        directory = Path(directory)
        index = directory / CHECKPOINT_INDEX_NAME
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / CHECKPOINT_NAME).is_file():
            shards = [CHECKPOINT_NAME]
        else:
            raise MethodError(f"{directory / CHECKPOINT_NAME} is missing: not a folder written by finetune's save()")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                state.update(load_file(str(directory / shard)))
            except Exception as err:  # safetensors raises several error types for a damaged or missing file
                raise MethodError(f"{directory / shard} is not a readable safetensors file ({err})") from err
        targets = self.trainable_state_dict(model)
        # save_pretrained writes tied weights (e.g. shared input/output embeddings) once; the other names follow
        loaded = {targets[name].data_ptr() for name in state if name in targets}
        targets = {name: t for name, t in targets.items() if name in state or t.data_ptr() not in loaded}
        copy_named_tensors(self.name, targets, state)
