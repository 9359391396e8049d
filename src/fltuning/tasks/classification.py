"""Single-sentence and sentence-pair classification (CLUE, FewCLUE), with CSL and CLUEWSC2020 as variants.

Inputs, built as the paper's code builds them (bert4keras ``Tokenizer.encode``):

    single:  [CLS] text [SEP]                    text cut at its end to fit ``max_length``
    pair:    [CLS] text [SEP] text_pair [SEP]    pop the last token of the longer side (the first side on ties)
                                                 until the whole fits ``max_length``
    CSL:     pair of ("；".join(keywords), abstract)
    WSC:     single text with span1 wrapped as _span1_ and span2 (the pronoun) as [span2]

No ``token_type_ids`` are produced: BERT-family backbones then use all-zero segment ids, as the paper's code feeds
them for pairs too, and decoder backbones have none. Tokenizers without [CLS] / [SEP] use BOS / EOS (or nothing).

Head: the pooled vector (the final-layer [CLS] by default) -> Linear(H, num_labels), TruncatedNormal(0.02) weights,
zero bias. Loss: cross-entropy. Metric: accuracy. Submission: ``{"id": ..., "label": ...}`` per test example, in file
order (the CLUE / FewCLUE format).

Labels are strings (``102``, ``entailment``, ``true``). A task either has a fixed label list or collects the sorted
set of labels from the first labelled file it reads, which must be the training file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fltuning.tasks.base import Batch, DataError, Example, Task, TaskHead, head_linear, iter_json_lines, pad

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: also used by the multiple-choice and bring-your-own-data tasks.


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The start token ([CLS], else BOS) and the separator ([SEP], else EOS), each as a list of zero or one id."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([start] if start is not None else []), ([sep] if sep is not None else [])


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens and without truncation."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def truncate_longest(parts: list[list[int]], budget: int, bias: Sequence[int] | None = None) -> list[list[int]]:
    """Pop the last token of the currently longest part until ``sum(len(part)) <= budget``, in place.

    Longest compares ``len(part) + bias[i]`` (the special tokens each part carries in the paper's code), and ties go to
    the earliest part, as bert4keras ``truncate_sequences`` does with ``np.argmax``."""
    bias = bias or [0] * len(parts)
    while sum(len(part) for part in parts) > budget:
        longest = max(range(len(parts)), key=lambda i: (len(parts[i]) + bias[i], -i))
        if not parts[longest]:
            raise ValueError(f"cannot fit {len(parts)} parts into {budget} tokens")
        parts[longest].pop()
    return parts


def require_text(record: dict[str, Any], key: str, path: str | Path, line: int | None) -> str:
    """``record[key]`` as a non-empty string. Raises ``DataError`` for a missing field, a non-string or empty text."""
    if key not in record:
        raise DataError(path, line, f"missing field {key!r} (fields present: {sorted(record)})")
    value = record[key]
    if value is None:
        raise DataError(path, line, f"no value in field {key!r}")
    if not isinstance(value, str):
        raise DataError(path, line, f"field {key!r} must be a string, got {type(value).__name__} {value!r:.40}")
    if not value.strip():
        raise DataError(path, line, f"empty text in field {key!r}")
    return value


def normalize_label(value: Any, path: str | Path, line: int | None) -> str:
    """A label as a string: ints and integral floats as digits (``102``), booleans as ``true`` / ``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(path, line, f"bad label {value!r}: expected a non-empty string or an integer")


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """Numeric labels in numeric order, then the others alphabetically."""
    return sorted(set(labels), key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def predictions_by_example(examples: list[Example], features: list[dict], predictions: list[Any]) -> list[Any]:
    """The prediction of each example's (single) feature, in example order. Raises ``ValueError`` when the lists do
    not line up or an example has no feature."""
    if len(features) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(features)} features")
    by_example: dict[int, Any] = {}
    for feature, prediction in zip(features, predictions, strict=True):
        by_example[feature["example_index"]] = prediction
    missing = [i for i in range(len(examples)) if i not in by_example]
    if missing:
        raise ValueError(f"{len(missing)} examples have no prediction, e.g. {examples[missing[0]].source}")
    return [by_example[i] for i in range(len(examples))]


def accuracy(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    """Fraction of positions where ``predicted`` equals ``gold``. Raises ``ValueError`` on empty or unequal lists."""
    if len(predicted) != len(gold) or not gold:
        raise ValueError(f"accuracy needs two equal non-empty lists, got {len(predicted)} and {len(gold)}")
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def mark_wsc_spans(text: str, span1_index: int, span1_text: str, span2_index: int, span2_text: str) -> str:
    """CLUEWSC2020 input as the paper's code writes it: ``_span1_`` around the noun phrase, ``[span2]`` around the
    pronoun, whichever comes first. Raises ``ValueError`` when a span's text is not at its index or the spans
    overlap."""
    s1, e1 = span1_index, span1_index + len(span1_text)
    s2, e2 = span2_index, span2_index + len(span2_text)
    for name, start, end, expected in (("span1", s1, e1, span1_text), ("span2", s2, e2, span2_text)):
        if start < 0 or text[start:end] != expected:
            raise ValueError(f"{name}_text {expected!r} is not at {name}_index {start} (found {text[start:end]!r})")
    if s1 < e2 and s2 < e1:
        raise ValueError(f"span1 [{s1}, {e1}) and span2 [{s2}, {e2}) overlap")
    if s1 < s2:
        return text[:s1] + "_" + text[s1:e1] + "_" + text[e1:s2] + "[" + text[s2:e2] + "]" + text[e2:]
    return text[:s2] + "[" + text[s2:e2] + "]" + text[e2:s1] + "_" + text[s1:e1] + "_" + text[e1:]


# ----------------------------------------------------------------------------------------------------------------


class ClassificationHead(TaskHead):
    """Pooled vector (B, H) -> logits (B, num_labels)."""

    pooled = True

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.dense = head_linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dense(hidden)


class ClassificationTask(Task):
    """Classify one text, or a pair, read from JSON Lines fields.

    ``labels``: the label list (its order fixes the label ids); None collects the sorted labels of the first labelled
    file read. ``skip_labels``: labelled examples to drop, e.g. OCNLI / CMNLI's ``-`` (no gold label; the paper's code
    keeps only entailment / neutral / contradiction). ``id_fields``: where the submission id comes from, first found;
    an example without one gets its 0-based position in the file. A record without ``label_field`` is unlabelled.
    """

    kind = "classification"
    metric = "accuracy"

    def __init__(
        self,
        name: str = "classification",
        text_field: str = "sentence",
        text_pair_field: str | None = None,
        label_field: str = "label",
        labels: Sequence[str] | None = None,
        skip_labels: Sequence[str] = (),
        id_fields: Sequence[str] = ("id",),
    ):
        self.name = name
        self.text_field = text_field
        self.text_pair_field = text_pair_field
        self.label_field = label_field
        self.labels = list(labels) if labels is not None else None
        self.skip_labels = tuple(skip_labels)
        self.id_fields = tuple(id_fields)
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {name!r}: duplicate labels in {self.labels}")

    # -- reading ---------------------------------------------------------------------------------------------------

    def records(self, path: str | Path) -> Iterable[tuple[int | None, dict[str, Any]]]:
        """``(line, record)`` pairs of a data file (JSON Lines here; other readers override this). Called before
        ``read`` looks at ``labels``, so a reader may set them (e.g. from a dataset's label names)."""
        return iter_json_lines(path)

    def source_name(self, path: str | Path) -> str:
        """How error messages name what ``path`` points to."""
        return str(path)

    def texts(self, record: dict[str, Any], path: str | Path, line: int | None) -> tuple[str, str | None]:
        """The text and the optional second text of one record."""
        text = require_text(record, self.text_field, path, line)
        pair = require_text(record, self.text_pair_field, path, line) if self.text_pair_field else None
        return text, pair

    def read(self, path: str | Path) -> list[Example]:
        rows, source = self.records(path), self.source_name(path)
        examples, dropped, collect = [], 0, self.labels is None
        for position, (line, record) in enumerate(rows):
            label = None
            if record.get(self.label_field) is not None:
                label = normalize_label(record[self.label_field], source, line)
                if label in self.skip_labels:
                    dropped += 1
                    continue
                if not collect and label not in self.labels:
                    shown = self.labels if len(self.labels) <= 20 else self.labels[:20] + ["..."]
                    raise DataError(source, line, f"unknown label {label!r}; task {self.name!r} has labels {shown}")
            text, pair = self.texts(record, source, line)
            uid = next((record[key] for key in self.id_fields if key in record), position)
            where = f"{source}:{line}" if line is not None else source
            examples.append(Example(uid=uid, fields={"text": text, "text_pair": pair}, label=label, source=where))
        if dropped:
            logger.info("%s: dropped %d examples labelled %s", source, dropped, "/".join(self.skip_labels))
        if collect and any(e.label is not None for e in examples):
            self.labels = sorted_labels(e.label for e in examples if e.label is not None)
            logger.info("%s: task %r collected %d labels from this file", source, self.name, len(self.labels))
        return examples

    # -- features --------------------------------------------------------------------------------------------------

    def label_ids(self) -> dict[str, int]:
        if self.labels is None:
            raise ValueError(f"task {self.name!r} has no labels yet: read the training file first, or pass labels=")
        return {label: i for i, label in enumerate(self.labels)}

    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        label_ids = self.label_ids() if any(e.label is not None for e in examples) else {}
        start, sep = special_tokens(tokenizer)
        firsts = tokenize(tokenizer, [e.fields["text"] for e in examples])
        paired = [i for i, e in enumerate(examples) if e.fields.get("text_pair") is not None]
        seconds = dict(
            zip(paired, tokenize(tokenizer, [examples[i].fields["text_pair"] for i in paired]), strict=True)
        )
        features = []
        for i, example in enumerate(examples):
            if i in seconds:
                budget = max_length - len(start) - 2 * len(sep)
                _check_budget(budget, max_length)
                first, second = truncate_longest([list(firsts[i]), list(seconds[i])], budget)
                input_ids = start + first + sep + second + sep
            else:
                budget = max_length - len(start) - len(sep)
                _check_budget(budget, max_length)
                input_ids = start + list(firsts[i][:budget]) + sep
            feature = {"input_ids": input_ids, "example_index": i}
            if example.label is not None:
                if example.label not in label_ids:
                    raise DataError(example.source, None, f"unknown label {example.label!r} for task {self.name!r}")
                feature["label"] = label_ids[example.label]
            features.append(feature)
        return features

    def collate(self, features: list[dict]) -> Batch:
        ids = [f["input_ids"] for f in features]
        inputs = {"input_ids": pad(ids), "attention_mask": pad([[1] * len(s) for s in ids])}
        targets = {}
        if features and all("label" in f for f in features):
            targets["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return Batch(inputs=inputs, targets=targets)

    # -- model side ------------------------------------------------------------------------------------------------

    def build_head(self, config: PretrainedConfig) -> ClassificationHead:
        return ClassificationHead(config.hidden_size, len(self.label_ids()))

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if "labels" not in batch.targets:
            raise ValueError("this batch has no labels (unlabelled examples cannot be trained on)")
        return F.cross_entropy(logits.float(), batch.targets["labels"])

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[int]:
        return logits.argmax(dim=-1).tolist()

    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        predicted = predictions_by_example(examples, features, predictions)
        label_ids = self.label_ids()
        pairs = [(p, label_ids[e.label]) for p, e in zip(predicted, examples, strict=True) if e.label is not None]
        if not pairs:
            raise ValueError(f"task {self.name!r}: no labelled examples to score")
        return {"accuracy": accuracy([p for p, _ in pairs], [g for _, g in pairs])}

    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        labels = self.labels or []
        predicted = predictions_by_example(examples, features, predictions)
        return [{"id": e.uid, "label": labels[p]} for e, p in zip(examples, predicted, strict=True)]


def _check_budget(budget: int, max_length: int) -> None:
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after the special tokens")


class CSLTask(ClassificationTask):
    """CSL: the keyword list joined with a full-width ``；`` is the first text, the abstract the second."""

    def __init__(self, name: str = "csl", keyword_field: str = "keyword", abstract_field: str = "abst", **kwargs):
        kwargs.setdefault("labels", ["0", "1"])
        super().__init__(name=name, text_field=abstract_field, **kwargs)
        self.keyword_field = keyword_field

    def texts(self, record: dict[str, Any], path: str | Path, line: int | None) -> tuple[str, str | None]:
        keywords = record.get(self.keyword_field)
        if keywords is None:
            raise DataError(path, line, f"missing field {self.keyword_field!r} (fields present: {sorted(record)})")
        if not isinstance(keywords, list) or not keywords:
            raise DataError(path, line, f"field {self.keyword_field!r} must be a non-empty list of strings")
        if not all(isinstance(k, str) and k.strip() for k in keywords):
            raise DataError(path, line, f"field {self.keyword_field!r} holds an empty or non-string keyword")
        return "；".join(keywords), require_text(record, self.text_field, path, line)


class WSCTask(ClassificationTask):
    """CLUEWSC2020 as single-sentence classification of the text with marked spans (see ``mark_wsc_spans``)."""

    def __init__(self, name: str = "cluewsc2020", **kwargs):
        kwargs.setdefault("labels", ["false", "true"])
        kwargs.setdefault("id_fields", ("id", "idx"))
        super().__init__(name=name, text_field="text", **kwargs)

    def texts(self, record: dict[str, Any], path: str | Path, line: int | None) -> tuple[str, str | None]:
        text = require_text(record, "text", path, line)
        target = record.get("target")
        if not isinstance(target, dict):
            raise DataError(path, line, "missing field 'target' (a dict with span1/span2 index and text)")
        for key, kind in (("span1_index", int), ("span2_index", int), ("span1_text", str), ("span2_text", str)):
            if not isinstance(target.get(key), kind) or isinstance(target.get(key), bool):
                raise DataError(path, line, f"target.{key} is missing or not a{'n int' if kind is int else ' string'}")
        try:
            marked = mark_wsc_spans(
                text, target["span1_index"], target["span1_text"], target["span2_index"], target["span2_text"]
            )
        except ValueError as err:
            raise DataError(path, line, str(err)) from err
        return marked, None
