"""LoRA (Hu et al., 2021) through PEFT: ``W x + (alpha / r) B A dropout(x)`` on chosen linear layers, B = 0 at init,
so training starts from the base model; ``merge_and_unload`` folds ``(alpha / r) B A`` into W exactly.

Default targets: every linear layer inside the repeated Transformer blocks (module paths with a layer number), which
are the attention and FFN projections: for BERT-family models query, key, value, attention.output.dense,
intermediate.dense and output.dense; for LLaMA / Qwen2 q/k/v/o_proj and gate/up/down_proj; for GPT-2 c_attn,
attn.c_proj, c_fc and mlp.c_proj. Embeddings, poolers and heads sit outside the blocks and stay untouched. The
targets are resolved to full module paths, so a suffix such as ``output.dense`` cannot match the wrong layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from fltuning.methods.base import MethodError, TuningMethod, copy_named_tensors, register_method
from fltuning.methods.budget import count_on_meta, size_for_budget

ADAPTER = "default"
_IN_BLOCK = re.compile(r"(?:^|\.)\d+\.")  # a path through a numbered block: "encoder.layer.3.", "layers.0.", "h.11."


def block_linear_layers(backbone: nn.Module) -> list[str]:
    """Full paths of the ``nn.Linear`` / GPT-2 ``Conv1D`` layers inside the repeated Transformer blocks."""
    return [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and _IN_BLOCK.search(name)
    ]


def _stable_name(peft_name: str) -> str:
    """``base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight`` ->
    ``encoder.layer.0.attention.self.query.lora_A.weight`` (no PEFT wrapper prefix, no adapter name)."""
    return peft_name.removeprefix("base_model.model.").replace(f".{ADAPTER}.", ".")


@register_method
@dataclass
class LoRA(TuningMethod):
    """LoRA with rank ``r``, scaling ``alpha / r`` and ``dropout`` on the adapter input. ``target_modules``: None
    for the attention and FFN projections (see the module docstring), or anything PEFT's ``target_modules``
    accepts (a list of name suffixes, or a regex that must match the full module path)."""

    name = "lora"
    mergeable = True

    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    target_modules: list[str] | str | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise MethodError(f"lora r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodError(f"lora dropout must be in [0, 1), got {self.dropout!r}")

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Freeze ``backbone`` and add LoRA layers; returns the ``PeftModel`` (called like the backbone). Raises
        ``MethodError`` when no layer matches the targets."""
        targets = self.target_modules if self.target_modules is not None else block_linear_layers(backbone)
        if not targets:
            raise MethodError(
                f"lora found no linear layers inside numbered blocks of {type(backbone).__name__}; pass target_modules"
            )
        conv1d = any(isinstance(m, Conv1D) for m in backbone.modules())
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias="none",
            fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores W transposed
        )
        try:
            return get_peft_model(backbone, config, adapter_name=ADAPTER)
        except ValueError as err:  # PEFT: "Target modules ... not found in the base model"
            raise MethodError(f"lora target_modules={self.target_modules!r}: {err}") from err

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The A and B matrices, e.g. ``encoder.layer.0.attention.self.query.lora_A.weight``."""
        return {_stable_name(name): p for name, p in model.named_parameters() if ".lora_" in name}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        copy_named_tensors(self.name, self.trainable_state_dict(model), state)

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merge_and_unload(self, model: nn.Module) -> nn.Module:
        """``W += (alpha / r) B A`` in every target; returns the plain transformers model without LoRA layers."""
        if not isinstance(model, PeftModel):
            raise MethodError(
                f"lora merge_and_unload needs the PeftModel returned by apply, got {type(model).__name__}"
            )
        return model.merge_and_unload()

    @classmethod
    def for_budget(cls, config: PretrainedConfig, budget: int, **settings: Any) -> LoRA:
        """The count is linear in r (r x (fan_in + fan_out) per target), measured on a meta-device build."""
        per_rank = count_on_meta(config, cls(**(settings | {"r": 1})))
        return cls(**(settings | {"r": size_for_budget(budget, per_rank)}))
