"""The contract every task type follows, so the training code never asks which task it runs.

A task turns files into examples (``read``), examples into model features (``encode``), features into tensors
(``collate``), builds its head on top of a backbone (``build_head``; the backbone is any module that maps
``input_ids, attention_mask`` to an output with ``last_hidden_state`` of shape (B, T, H)), computes its loss
(``loss``), turns logits into compact per-feature predictions (``decode``), and scores (``score``) or writes
submission records (``submission``) from them.

One example can give several features (a reading-comprehension passage cut into windows, a multiple-choice question
with its options packed in one feature). Every feature carries ``example_index`` so predictions can be grouped back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase


class DataError(ValueError):
    """Malformed input data. The message names the file and line (1-based) to fix."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = str(path), line


@dataclass
class Example:
    """One raw example. ``fields`` holds the task's parsed fields; ``label`` is None for unlabelled test data."""

    uid: Any  # the id written back in submission files (the file's "id" field, or the line index)
    fields: dict[str, Any]
    label: Any = None
    source: str = ""  # "file:line", for error messages


@dataclass
class Batch:
    """What ``collate`` returns: model inputs plus anything ``loss`` / ``decode`` need, all tensors."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor] = field(default_factory=dict)


class TaskHead(nn.Module):
    """A head reads the backbone's hidden states and returns logits. Subclasses define ``forward(hidden, batch)``.

    ``batch`` is the dict of model inputs (``Batch.inputs``: ``input_ids``, ``attention_mask`` and any extra input
    the task's ``collate`` put there for its head). ``hidden`` is the backbone's ``last_hidden_state`` (B, T, H), or,
    when the head sets ``pooled = True``, one vector per sequence (B, H) chosen by the task model's pooling ("cls",
    "last" or "mean"; see ``fltuning.tasks.model``). Multiple-choice inputs (B, C, T) arrive flattened to (B*C, T).
    """

    pooled: ClassVar[bool] = False


def head_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A dense layer initialised as the paper's heads: TruncatedNormal(0.02) cut at 2 std, zero bias."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02, a=-0.04, b=0.04)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for every non-blank line of a JSON Lines file (1-based line numbers).

    Raises ``DataError`` naming the file and line for a line that is not valid JSON or not a JSON object, and for a
    missing or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    try:
        with path.open(encoding="utf-8-sig") as handle:  # a leading BOM is not an error
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from err
                if not isinstance(record, dict):
                    raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
                yield number, record
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"not UTF-8 text ({err})") from err


class Task(ABC):
    """A task type with its settings (labels, field names...)."""

    kind: ClassVar[str]  # "classification", "ner", "mrc", "multiple_choice", ...
    metric: ClassVar[str]  # key of ``score``'s result used to select the best checkpoint, e.g. "accuracy", "f1"

    @abstractmethod
    def read(self, path: str | Path) -> list[Example]:
        """Parse a data file strictly. Raises ``DataError`` naming file and line for a bad JSON line, a missing
        field, an unknown label or an empty text."""

    @abstractmethod
    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        """Features for the model: plain Python dicts (lists and ints), each with ``example_index``."""

    @abstractmethod
    def collate(self, features: list[dict]) -> Batch:
        """Pad and stack features into tensors."""

    @abstractmethod
    def build_head(self, config: PretrainedConfig) -> TaskHead:
        """The task head for a backbone with this config (TruncatedNormal(0.02) weights, zero biases)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar training loss."""

    @abstractmethod
    def decode(self, logits: torch.Tensor, batch: Batch) -> list[Any]:
        """Compact predictions, one per feature in the batch (e.g. a label id, a list of spans)."""

    @abstractmethod
    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        """Metrics over labelled examples (``predictions[i]`` belongs to ``features[i]``)."""

    @abstractmethod
    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        """One record per example, in example order, in the task's CLUE submission format."""


def pad(sequences: Sequence[Sequence[int]], value: int = 0, length: int | None = None) -> torch.Tensor:
    """Right-pad integer sequences into a (N, length) long tensor (length: the longest, unless given)."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out
