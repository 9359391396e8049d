"""The task model: a backbone (possibly wrapped by a tuning method) plus a task head.

    hidden = backbone(input_ids, attention_mask[, token_type_ids]).last_hidden_state    # (B, T, H)
    logits = head(pool(hidden), inputs)   if head.pooled                                 # (B, H) -> (B, K)
    logits = head(hidden, inputs)         otherwise                                      # e.g. (B, K, T, T)

Multiple-choice inputs (B, C, T) are flattened to (B*C, T) for the backbone and the head, and the logits are
reshaped back to (B, C, ...).

Pooling picks one vector per sequence for pooled heads:
- "cls": the first position, the final-layer [CLS] vector with no pooler and no dropout (the paper's heads);
- "last": the last non-padding position, for decoder backbones (LLaMA), whose first token has seen nothing;
- "mean": the mean over non-padding positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from fltuning.tasks.base import Task, TaskHead

POOLINGS = ("cls", "last", "mean")
BACKBONE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")  # the rest goes to the head only


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence: (B, T, H), (B, T) -> (B, H). Raises ``ValueError`` for an unknown pooling."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        # Index of the last attended position; right or left padding alike.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def default_pooling(config: PretrainedConfig) -> str:
    """ "last" for decoder-only language models (a causal-LM architecture with no masked-LM one), else "cls"."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "last"
    return "cls"


class TaskModel(nn.Module):
    """``backbone`` + ``head``; ``forward(**batch.inputs)`` returns the head's logits.

    The loss is not computed here: the training code calls ``task.loss(logits, batch)``. Works with HF ``Trainer``
    when its ``compute_loss`` does that (``accepts_loss_kwargs`` is False, so Trainer never passes loss arguments).
    """

    accepts_loss_kwargs = False

    def __init__(self, backbone: nn.Module, head: TaskHead, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling
        config = getattr(backbone, "config", None)
        if config is not None:
            self.config = config  # Trainer and logging read model.config when there is one

    @classmethod
    def for_task(cls, task: Task, backbone: nn.Module, pooling: str | None = None) -> TaskModel:
        """The task's head (``task.build_head(backbone.config)``) on ``backbone``; pooling defaults to
        ``default_pooling(backbone.config)``."""
        config = getattr(backbone, "config", None)
        if config is None:
            raise ValueError("the backbone has no .config: build the head with task.build_head(config) instead")
        return cls(backbone, task.build_head(config), pooling or default_pooling(config))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **head_inputs: Any,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        choices = input_ids.shape[:2] if input_ids.dim() == 3 else None
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if choices is not None:  # (B, C, T) -> (B*C, T)
            inputs = {key: value.flatten(0, 1) for key, value in inputs.items()}
            head_inputs = {
                key: value.flatten(0, 1) if torch.is_tensor(value) and value.shape[:2] == choices else value
                for key, value in head_inputs.items()
            }
        hidden = self.backbone(**inputs).last_hidden_state
        length = inputs["input_ids"].shape[1]
        if hidden.shape[1] > length:
            # A method that prepends virtual tokens (prompt tuning) returns P + T positions: keep the real ones.
            hidden = hidden[:, -length:]
        features = pool(hidden, inputs["attention_mask"], self.pooling) if self.head.pooled else hidden
        logits = self.head(features, {**inputs, **head_inputs})
        if choices is not None:  # (B*C, ...) -> (B, C, ...)
            logits = logits.reshape(*choices, *logits.shape[1:])
        return logits
