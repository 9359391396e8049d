"""Prompt tuning (Lester et al., 2021): P trained embeddings in front of the input embeddings, nothing else trains.

    inputs_embeds' = [E ; embed(input_ids)]    # (B, P + T, d), E of shape (P, d)
    output = backbone(inputs_embeds').last_hidden_state[:, P:]    # (B, T, d): the virtual tokens are stripped

The prompt is PEFT's ``PromptEmbedding`` built from a ``PromptTuningConfig`` (PEFT's inits: "random" = N(0, 1),
"sample_vocab" = rows of the word embedding, "text" = the embedding of a text). The forward pass is this module's own:
PEFT's feature-extraction model drops ``token_type_ids``, and its outputs keep the virtual positions. Here the
virtual tokens get segment 0, the mask is extended with P ones, explicit ``position_ids`` are shifted by P (the prompt
takes positions 0..P-1, as when the model numbers positions itself), and the outputs are cut back to the input length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from peft import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from torch import nn
from transformers import PretrainedConfig

from fltuning.methods.base import MethodError, TuningMethod, copy_named_tensors, freeze, register_method
from fltuning.methods.budget import count_on_meta, size_for_budget

INITS = {
    "random": PromptTuningInit.RANDOM,
    "sample_vocab": PromptTuningInit.SAMPLE_VOCAB,
    "text": PromptTuningInit.TEXT,
}
STATE_KEY = "prompt_embeddings"  # PEFT's name for this tensor in its adapter files
MAX_BUDGET_TOKENS = 100  # for_budget's cap: more virtual tokens than this crowd out real input on 512-position models


class PromptTunedModel(nn.Module):
    """``backbone`` with ``prompt`` (P trained input embeddings) in front of every sequence. Called like the backbone;
    returns the backbone's output with the virtual positions removed from ``last_hidden_state`` and
    ``hidden_states`` (``attentions``, if asked for, keep them)."""

    def __init__(self, backbone: nn.Module, prompt: PromptEmbedding, num_virtual_tokens: int):
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.num_virtual_tokens = num_virtual_tokens
        self.register_buffer("prompt_indices", torch.arange(num_virtual_tokens), persistent=False)

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.backbone.get_input_embeddings()(input_ids)
        batch, p = inputs_embeds.shape[0], self.num_virtual_tokens
        prompt = self.prompt(self.prompt_indices).to(inputs_embeds.dtype).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, p), token_type_ids], dim=1)
        if position_ids is not None:
            prompt_positions = self.prompt_indices.to(position_ids).expand(position_ids.shape[0], -1)
            kwargs["position_ids"] = torch.cat([prompt_positions, position_ids + p], dim=1)
        output = self.backbone(**kwargs)
        output.last_hidden_state = output.last_hidden_state[:, p:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, p:] for h in output.hidden_states)
        return output


@register_method
@dataclass
class PromptTuning(TuningMethod):
    """``num_virtual_tokens`` trained input embeddings. ``init``: "sample_vocab" (default: rows of the word
    embedding, so the prompt starts at the scale of real tokens), "random" (PEFT's N(0, 1)) or "text" (the embedding
    of ``init_text`` tokenized by ``tokenizer``, a local folder or hub id)."""

    name = "prompt_tuning"

    num_virtual_tokens: int = 20
    init: str = "sample_vocab"
    init_text: str | None = None
    tokenizer: str | None = None

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise MethodError(
                f"prompt_tuning num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}"
            )
        if self.init not in INITS:
            raise MethodError(f"prompt_tuning init must be one of {sorted(INITS)}, got {self.init!r}")
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise MethodError('prompt_tuning init="text" needs init_text and tokenizer (a folder or hub id)')

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Freeze ``backbone`` and wrap it in a ``PromptTunedModel``. Raises ``MethodError`` for a backbone without
        ``get_input_embeddings``."""
        get_embeddings = getattr(backbone, "get_input_embeddings", None)
        word_embeddings = get_embeddings() if get_embeddings else None
        if not isinstance(word_embeddings, nn.Embedding):
            raise MethodError(
                f"prompt_tuning needs a backbone with input embeddings; {type(backbone).__name__} has none"
            )
        config = PromptTuningConfig(
            task_type="FEATURE_EXTRACTION",
            num_virtual_tokens=self.num_virtual_tokens,
            token_dim=word_embeddings.embedding_dim,
            num_transformer_submodules=1,
            prompt_tuning_init=INITS[self.init],
            prompt_tuning_init_text=self.init_text,
            tokenizer_name_or_path=self.tokenizer,
        )
        freeze(backbone)
        prompt = PromptEmbedding(config, word_embeddings).to(word_embeddings.weight.device)
        return PromptTunedModel(backbone, prompt, self.num_virtual_tokens)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"prompt_embeddings": (P, d)}``."""
        if not isinstance(model, PromptTunedModel):
            raise MethodError(f"expected the PromptTunedModel returned by apply, got {type(model).__name__}")
        return {STATE_KEY: model.prompt.embedding.weight}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        copy_named_tensors(self.name, self.trainable_state_dict(model), state)

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def unload(self, model: nn.Module) -> nn.Module:
        """The backbone without the prompt."""
        if not isinstance(model, PromptTunedModel):
            raise MethodError(f"expected the PromptTunedModel returned by apply, got {type(model).__name__}")
        return model.backbone

    @classmethod
    def for_budget(
        cls, config: PretrainedConfig, budget: int, max_tokens: int = MAX_BUDGET_TOKENS, **settings: Any
    ) -> PromptTuning:
        """P nearest to ``budget / d``, capped at ``max_tokens``: FL-tuning's budget on BERT-base would need about
        3,854 virtual tokens, more than the model has positions."""
        per_token = count_on_meta(config, cls(**(settings | {"num_virtual_tokens": 1, "init": "random"})))
        size = min(size_for_budget(budget, per_token), max_tokens)
        return cls(**(settings | {"num_virtual_tokens": size}))
