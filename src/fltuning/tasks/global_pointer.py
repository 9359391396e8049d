"""GlobalPointer: a span-scoring head, its multilabel loss, and token-to-character span mapping.

GlobalPointer (Su Jianlin; bert4keras ``layers.GlobalPointer``, as used by the paper's CLUENER and CMRC2018 code)
scores every token pair (i, j) for every head h (an entity type, or the single "answer" head)::

    [q_i^h ; k_i^h] = W_h x_i                          # x: (B,T,H) -> q, k: (B,T,heads,d); no bias, as in the paper
    s_h(i, j) = <R_i q_i^h, R_j k_j^h> / sqrt(d)         # R_i: rotary position embedding (RoPE) of position i
    s_h(i, j) <= -1e12 / sqrt(d)  where i or j is padding, or j < i     # (B,heads,T,T)

RoPE rotates each pair of dimensions (2m, 2m+1) by the angle ``i * 10000^(-2m/d)``, so s_h(i, j) depends on the
positions only through j - i.

The multilabel categorical cross-entropy (Su Jianlin's "circle loss" form) for scores s and 0/1 targets y over one
flattened (type, L, L) row is ``log(1 + sum_{y=0} e^{s}) + log(1 + sum_{y=1} e^{-s})``: every positive should score
above 0 and every negative below 0, which is also the decoding rule (a span is predicted when its score is > 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fltuning.tasks.base import TaskHead, head_linear

#: What bert4keras adds for "minus infinity" (``K.infinity()``): large, yet finite so that 0 * mask stays 0.
MASK_VALUE = 1e12

#: Marker characters that sentencepiece / byte-level BPE tokenizers put on word-initial tokens.
_WORD_MARKERS = "▁Ġ"


def rotary_position_embedding(x: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, heads, d) by position, as bert4keras' ``SinusoidalPositionEmbedding(d, 'zero')`` + RoPE.

    Positions are 0..T-1. Dimension pair (2m, 2m+1) at position p is rotated by the angle p * 10000^(-2m/d):
    ``x'_{2m} = x_{2m} cos - x_{2m+1} sin``, ``x'_{2m+1} = x_{2m+1} cos + x_{2m} sin``.
    """
    _, seq_len, _, dim = x.shape
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim // 2, dtype=torch.float32, device=x.device) * 2 / dim)
    angles = torch.arange(seq_len, dtype=torch.float32, device=x.device)[:, None] * inv_freq  # (T, d/2)
    cos = angles.cos().repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)  # (1, T, 1, d)
    sin = angles.sin().repeat_interleave(2, dim=-1)[None, :, None, :].to(x.dtype)
    rotated_half = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)  # (-x1, x0, -x3, x2, ...)
    return x * cos + rotated_half * sin


class GlobalPointer(TaskHead):
    """Span scores for every (head, start, end): (B, T, H) -> (B, heads, T, T), float32.

    ``forward(hidden, batch)`` as every ``TaskHead``: only ``batch["attention_mask"]`` (B, T) is read; without it no
    position counts as padding. As in bert4keras, pairs touching padding are set to -1e12 and pairs with end < start
    get a further -1e12 before the 1/sqrt(d) scaling, so every masked score is at most -1e12 / sqrt(d).

    Raises ``ValueError`` if ``head_size`` is odd (RoPE rotates pairs of dimensions).
    """

    def __init__(self, hidden_size: int, heads: int, head_size: int = 64, use_rope: bool = True, bias: bool = False):
        super().__init__()
        if head_size % 2:
            raise ValueError(f"GlobalPointer head_size must be even for RoPE, got {head_size}")
        self.heads, self.head_size, self.use_rope = heads, head_size, use_rope
        self.dense = head_linear(hidden_size, heads * head_size * 2, bias=bias)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        attention_mask = (batch or {}).get("attention_mask")
        size, seq_len, _ = hidden.shape
        projected = self.dense(hidden).float().view(size, seq_len, self.heads, 2 * self.head_size)
        q, k = projected[..., : self.head_size], projected[..., self.head_size :]  # (B, T, heads, d) each
        if self.use_rope:
            q, k = rotary_position_embedding(q), rotary_position_embedding(k)
        scores = torch.einsum("bmhd,bnhd->bhmn", q, k)  # (B, heads, T, T)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            scores = scores.masked_fill(~(keep[:, None, :, None] & keep[:, None, None, :]), -MASK_VALUE)
        below_diagonal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=scores.device).tril(-1)
        scores = scores - below_diagonal * MASK_VALUE
        return scores / math.sqrt(self.head_size)


def multilabel_categorical_crossentropy(targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Su Jianlin's multilabel softmax loss over the last dimension: (..., N) 0/1 targets, (..., N) scores -> (...).

    ``log(1 + sum_{neg} exp(s)) + log(1 + sum_{pos} exp(-s))``, computed with logsumexp and an appended 0 logit.
    """
    targets = targets.to(scores.dtype)
    signed = (1 - 2 * targets) * scores  # positives enter as -s
    negatives = signed - targets * MASK_VALUE
    positives = signed - (1 - targets) * MASK_VALUE
    zeros = torch.zeros_like(scores[..., :1])
    negative_loss = torch.logsumexp(torch.cat([negatives, zeros], dim=-1), dim=-1)
    positive_loss = torch.logsumexp(torch.cat([positives, zeros], dim=-1), dim=-1)
    return negative_loss + positive_loss


def global_pointer_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean multilabel CE over (example, head) rows: scores and 0/1 targets (B, heads, T, T) -> scalar.

    As the paper's CLUENER code (``global_pointer_crossentropy``): each (example, type) flattens its T x T scores.
    """
    batch, heads = scores.shape[:2]
    return multilabel_categorical_crossentropy(
        targets.reshape(batch * heads, -1), scores.float().reshape(batch * heads, -1)
    ).mean()


def token_char_spans(
    offsets: Sequence[Sequence[int]], keep: Sequence[bool], text: str, tokens: Sequence[str] | None = None
) -> list[tuple[int, int] | None]:
    """The characters ``[start, end)`` of ``text`` that each kept token stands for, or None for a token with none.

    ``offsets`` is a fast tokenizer's ``offset_mapping`` into ``text``; ``keep`` marks the tokens that belong to
    ``text`` (not specials, not the other sequence of a pair). Made robust for span tasks:

    - leading and trailing whitespace is trimmed off a token's span (sentencepiece's "▁" may claim a space);
    - a token whose span runs into the next kept token's span is cut where that token starts (XLM-R's lone "▁"
      before "北京" has offsets (0, 1) while "北京" has (0, 2): the lone marker then owns no character);
    - a token that is only a word marker ("▁", "Ġ"), when ``tokens`` are given, owns no character.

    Characters no kept token owns (whitespace, truncated text) cannot start or end a span.
    """
    spans: list[tuple[int, int] | None] = [None] * len(offsets)
    kept = [i for i, (start, end) in enumerate(offsets) if keep[i] and end > start]
    for n, i in enumerate(kept):
        start, end = offsets[i]
        if n + 1 < len(kept):
            end = min(end, max(start, offsets[kept[n + 1]][0]))
        if tokens is not None and not tokens[i].strip(_WORD_MARKERS):
            continue
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start < end:
            spans[i] = (start, end)
    return spans
