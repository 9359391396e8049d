"""Matrix-multiply FLOPs of one Transformer step, and the extra share the k FL units add: the yardstick of the targets.

Per token and layer, counting a multiply-add as 2 FLOPs (d hidden, d_kv = kv_heads x head_dim, d_ff FFN width,
T keys per query, k FL units; a gated FFN has three projections, a plain one two):

    L = 2 d (2 d + 2 d_kv) + 2 d d_ff (2 or 3)     # frozen linear layers: q, k, v, o, up (gate), down
    A = 4 T d                                      # attention: Q K^T and P V
    U = 2 d k (2 or 3)                             # the FL units: U1 (V1), U2

A frozen linear layer costs its forward plus the input gradient (2x), attention both operand gradients (3x), the
trainable units forward, input and weight gradient (3x), so, with the share of the units in each:

    FL training step = 2 L + 3 A + 3 U         share_train = 3 U / (2 L + 3 A)
    inference        =   L +   A +   U         share_infer =   U / (L + A)

In the first layer nothing below the FFN output needs a gradient, so autograd skips its input gradients (L + 2 A
and those of U1 / V1); ``fl_step_flops`` subtracts them. Embedding lookups, LayerNorm, softmax, activations,
dropout and the task head are left out: they are not matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class LayerFlops:
    """Forward matmul FLOPs per token of one layer: frozen linear layers, attention, FL units."""

    linear: int
    attention: int
    units: int
    units_in: int  # the part of ``units`` in U1 (and V1), whose input gradient layer 0 skips

    @property
    def share_train(self) -> float:
        return 3 * self.units / (2 * self.linear + 3 * self.attention)

    @property
    def share_infer(self) -> float:
        return self.units / (self.linear + self.attention)


def shapes(config: PretrainedConfig) -> tuple[int, int, int, bool]:
    """(d, d_kv, d_ff, gated) of a BERT- or LLaMA-style config."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "gemma")
    return d, kv_heads * head_dim, config.intermediate_size, gated


def layer_flops(config: PretrainedConfig, seq_len: int, num_units: int) -> LayerFlops:
    """The per-token FLOPs of one layer at ``seq_len`` keys with ``num_units`` FL units (see the module docstring)."""
    d, d_kv, d_ff, gated = shapes(config)
    n_up = 3 if gated else 2
    return LayerFlops(
        linear=2 * d * (2 * d + 2 * d_kv) + 2 * d * d_ff * n_up,
        attention=4 * seq_len * d,
        units=2 * d * num_units * n_up,
        units_in=2 * d * num_units * (n_up - 1),
    )


def fl_step_flops(config: PretrainedConfig, batch: int, seq_len: int, num_units: int) -> int:
    """Matmul FLOPs of one FL training step (forward + backward) over the whole model."""
    f = layer_flops(config, seq_len, num_units)
    per_layer = 2 * f.linear + 3 * f.attention + 3 * f.units
    first_layer_skips = f.linear + 2 * f.attention + f.units_in
    return batch * seq_len * (config.num_hidden_layers * per_layer - first_layer_skips)


def forward_flops(config: PretrainedConfig, batch: int, seq_len: int, num_units: int = 0) -> int:
    """Matmul FLOPs of one forward pass (merged or unmerged FL units alike)."""
    f = layer_flops(config, seq_len, num_units)
    return batch * seq_len * config.num_hidden_layers * (f.linear + f.attention + f.units)
