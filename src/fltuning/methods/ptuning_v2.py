"""P-tuning v2 (Liu et al., 2022), the FL-tuning paper's main baseline, as the paper's code builds it.

In every self-attention layer, P learned key and value vectors per key/value head go in front of the projected keys
and values, after any rotary position embedding, so the prompts carry no position. Every real query sees all P
prompts, also under a causal mask. Only real tokens make queries, so the output keeps its length:

    K' = [dropout(Pk) ; K]    V' = [dropout(Pv) ; V]            # (B, kv_heads, P + T, head_dim)
    out = softmax(Q K'^T * scaling + [0 ; mask]) V'             # (B, heads, T, head_dim)

Pk and Pv have shape (P, kv_heads, head_dim) and start from TruncatedNormal(0.02) (cut at 2 std). The prompt dropout
is 0.1. There is no reparameterisation. With grouped-query attention the prompts have ``num_key_value_heads`` heads
and are shared by each group of query heads, like the real keys. A model that reuses one attention module in every
layer (ALBERT) reuses its prompts too.

How the prompts get in: each self-attention module gets a ``ptuning_v2`` child (``PromptKeyValue``) holding Pk and
Pv. The model switches to the attention function registered with transformers' ``AttentionInterface`` under
``ATTENTION_NAME``. Every layer calls it with ``(module, query, key, value, attention_mask, ...)`` after the
projections, and it prepends that module's prompts and calls the model's previous kernel (sdpa, or eager).

The same name is registered with ``AttentionMaskInterface``, using sdpa's mask forced to materialise. Without a mask
function under that name, transformers passes ``attention_mask=None`` and padding is silently attended to. A
materialised mask also keeps sdpa from assuming a plain causal pattern over the longer key sequence.

PEFT's prefix tuning cannot do this on transformers 5: it refuses encoders ("Model does not support past key
values").
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fltuning.methods.base import MethodError, TuningMethod, copy_named_tensors, freeze, register_method
from fltuning.methods.budget import count_on_meta, size_for_budget

ATTENTION_NAME = "fltuning_ptuning_v2"
PROMPTS_ATTR = "ptuning_v2"  # the child module name, so every prompt tensor's name contains ".ptuning_v2."
_ORIGINAL_ATTR = "_ptuning_v2_original_attn_implementation"
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")  # LLaMA / GPT-2 style, BERT style


class PromptKeyValue(nn.Module):
    """One layer's prompts: ``key`` and ``value`` of shape (P, kv_heads, head_dim), plus the kernel to call."""

    def __init__(
        self,
        num_prompts: int,
        num_heads: int,
        head_dim: int,
        dropout: float,
        init_std: float,
        kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
        device: torch.device | None = None,
    ):
        super().__init__()
        self.key = nn.Parameter(torch.empty(num_prompts, num_heads, head_dim, device=device))
        self.value = nn.Parameter(torch.empty(num_prompts, num_heads, head_dim, device=device))
        for p in (self.key, self.value):
            nn.init.trunc_normal_(p, std=init_std, a=-2 * init_std, b=2 * init_std)
        self.dropout = nn.Dropout(dropout)
        self.kernel = kernel
        self.additive_mask = kernel is not sdpa_attention_forward  # eager kernels add the mask to the scores

    @property
    def num_prompts(self) -> int:
        return self.key.shape[0]

    def forward(self, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prompts in attention layout (B, kv_heads, P, head_dim), each example with its own
        dropout mask."""

        def batched(p: torch.Tensor) -> torch.Tensor:
            return self.dropout(p.to(dtype).transpose(0, 1).unsqueeze(0).expand(batch_size, -1, -1, -1))

        return batched(self.key), batched(self.value)

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,  # (B, heads, T, head_dim)
        key: torch.Tensor,  # (B, kv_heads, S, head_dim), S = T (+ cached positions when generating)
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,  # (B, 1, T, S): bool (True = attend) or additive float
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompt_key, prompt_value = self(key.shape[0], key.dtype)
        if prompt_key.shape[1:] != (key.shape[1], self.num_prompts, key.shape[3]):
            raise MethodError(
                f"P-tuning v2 prompts of {type(module).__name__} have shape {tuple(self.key.shape)} (P, heads, "
                f"head_dim) but the layer's keys have {key.shape[1]} heads of size {key.shape[3]}"
            )
        if attention_mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
            attention_mask = _causal_mask(query.shape[2], key.shape[2], key.device)
        if attention_mask is not None:
            shape = (*attention_mask.shape[:-1], self.num_prompts)
            is_bool = attention_mask.dtype == torch.bool  # True = attend; an additive float mask attends at 0
            visible = attention_mask.new_ones(shape) if is_bool else attention_mask.new_zeros(shape)
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
            if self.additive_mask:
                attention_mask = _additive(attention_mask, query.dtype)
        key, value = torch.cat([prompt_key, key], dim=2), torch.cat([prompt_value, value], dim=2)
        return self.kernel(module, query, key, value, attention_mask, **kwargs)


def _causal_mask(q_length: int, kv_length: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) bool mask, queries aligned to the end of the keys. Only reached by models that hand a causal
    layer no mask at all; models using ``masking_utils`` get a materialised mask from ``_materialised_mask``."""
    last_visible = torch.arange(q_length, device=device)[:, None] + (kv_length - q_length)
    return (torch.arange(kv_length, device=device) <= last_visible)[None, None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def prompted_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function every layer calls while P-tuning v2 is applied. Layers without prompts (cross-
    attention) run plain sdpa."""
    prompts = getattr(module, PROMPTS_ATTR, None)
    if prompts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return prompts.attend(module, query, key, value, attention_mask, **kwargs)


def _materialised_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's boolean (B, 1, T, S) mask, never skipped: the attention function must see padding and causality to
    extend them, and sdpa's ``is_causal`` shortcut would misalign once prompts make the keys longer."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prompted_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _materialised_mask)


def self_attention_modules(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules that call transformers' attention interface: those with the attributes its
    functions read (``scaling``, ``is_causal``) and a head size, minus cross-attention."""
    found = []
    for name, module in backbone.named_modules():
        if not (hasattr(module, "scaling") and hasattr(module, "is_causal")):
            continue
        if not any(hasattr(module, a) for a in _HEAD_DIM_ATTRS):
            continue
        if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
            continue
        found.append((name, module))
    return found


def _kernel_for(module: nn.Module, implementation: str | None) -> Callable[..., Any]:
    """The model's own eager function when it ran eager (keeps ``output_attentions``), sdpa otherwise."""
    if implementation == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is not None:
            return eager
    return sdpa_attention_forward


@register_method
@dataclass
class PTuningV2(TuningMethod):
    """Deep key/value prompts in every self-attention layer.

    ``num_prompts``: P, the prompts per layer (160 is parameter-matched to FL-tuning's k = 160 on BERT-base).
    ``dropout``: dropout on the prompts while training. ``init_std``: std of the truncated-normal init."""

    name = "ptuning_v2"

    num_prompts: int = 160
    dropout: float = 0.1
    init_std: float = 0.02

    def __post_init__(self):
        if not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise MethodError(f"ptuning_v2 num_prompts must be an integer >= 0, got {self.num_prompts!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MethodError(f"ptuning_v2 dropout must be in [0, 1), got {self.dropout!r}")

    def apply(self, backbone: nn.Module) -> nn.Module:
        """Freeze ``backbone``, give each self-attention layer its prompts and switch the model to the prompted
        attention function. Returns ``backbone`` itself. Raises ``MethodError`` for a model whose attention does
        not go through transformers' attention interface, or one that already has prompts."""
        if not isinstance(backbone, PreTrainedModel) or not backbone._can_set_attn_implementation():
            raise MethodError(
                f"ptuning_v2 needs a transformers model whose attention uses the AttentionInterface; "
                f"{type(backbone).__name__} does not"
            )
        if hasattr(backbone, _ORIGINAL_ATTR):
            raise MethodError("ptuning_v2 is already applied to this model; call unload() first")
        layers = self_attention_modules(backbone)
        if not layers:
            raise MethodError(f"ptuning_v2 found no self-attention layers in {type(backbone).__name__}")
        config = backbone.config
        original = config._attn_implementation
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        freeze(backbone)
        for _, module in layers:
            head_dim = next(getattr(module, a) for a in _HEAD_DIM_ATTRS if hasattr(module, a))
            device = next(module.parameters()).device
            kernel = _kernel_for(module, original)
            prompts = PromptKeyValue(
                self.num_prompts, num_kv_heads, head_dim, self.dropout, self.init_std, kernel, device
            )
            prompts.train(backbone.training)
            module.add_module(PROMPTS_ATTR, prompts)
        setattr(backbone, _ORIGINAL_ATTR, original)
        backbone.set_attn_implementation(ATTENTION_NAME)
        return backbone

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the prompts and restore the model's original attention implementation; returns the model."""
        original = getattr(model, _ORIGINAL_ATTR, None)
        if original is None:
            raise MethodError("ptuning_v2 is not applied to this model")
        for _, module in self_attention_modules(model):
            if hasattr(module, PROMPTS_ATTR):
                delattr(module, PROMPTS_ATTR)
        model.set_attn_implementation(original)
        delattr(model, _ORIGINAL_ATTR)
        return model

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{layer path}.ptuning_v2.key`` / ``.value`` for every layer, e.g. ``encoder.layer.0.attention.self.
        ptuning_v2.key``."""
        return {name: p for name, p in model.named_parameters() if f".{PROMPTS_ATTR}." in f".{name}"}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        copy_named_tensors(self.name, self.trainable_state_dict(model), state)

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_budget(cls, config: PretrainedConfig, budget: int, **settings: Any) -> PTuningV2:
        """The count is linear in P (layers x 2 x kv_heads x head_dim per prompt), measured on a meta-device build."""
        per_prompt = count_on_meta(config, cls(**(settings | {"num_prompts": 1})))
        return cls(**(settings | {"num_prompts": size_for_budget(budget, per_prompt)}))
