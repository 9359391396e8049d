"""CLUENER2020 fine-grained NER with a GlobalPointer head (10 entity types), scored on character spans.

Data: JSON Lines ``{"id"?: ..., "text": ..., "label": {type: {entity: [[start, end_inclusive], ...]}}}``; test
files have no ``label``. Submission: the same shape, one line per example (CLUE's ``cluener_predict.json``).

Pipeline (the paper's ``cluener.py``):

- ``encode``: ``[CLS] text [SEP]`` truncated to ``max_length``; each token keeps the characters it stands for
  (``token_char_spans``: the fast tokenizer's offsets, made robust to sentencepiece's "▁" and to tokens that cover
  several characters). A gold entity is a training target (type, start token, end token) only when some token starts
  exactly at its first character and some token ends exactly after its last one; otherwise (truncated away, or
  its boundary falls inside a token) it cannot be represented and is counted in the feature's ``unencoded``.
- ``build_head``: ``GlobalPointer(heads=10, head_size=64)``, no bias, RoPE. ``loss``: multilabel categorical CE
  per (example, type). ``decode``: every (type, start, end) whose score is > 0 and whose tokens carry characters.
- ``score``: predictions are mapped back to character spans and compared with the *file's* gold spans, entity-level
  micro P/R/F1 over (type, start, end) plus F1 per type, as fractions in [0, 1]. Entities that the encoding could
  not represent therefore count as misses: truncation and tokenisation cannot inflate the score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fltuning.tasks.base import Batch, DataError, Example, Task, iter_json_lines, pad
from fltuning.tasks.global_pointer import GlobalPointer, global_pointer_loss, token_char_spans

#: CLUENER2020's entity types, in the order of the paper's code (head index = position here).
CLUENER_TYPES = (
    "address",
    "book",
    "company",
    "game",
    "government",
    "movie",
    "name",
    "organization",
    "position",
    "scene",
)

Span = tuple[str, int, int]  # (type, first character, last character), as in CLUENER's [start, end] pairs


class NERTask(Task):
    """CLUENER2020 (or any CLUENER-format data with ``entity_types``): GlobalPointer spans, micro F1 on characters."""

    kind = "ner"
    metric = "f1"

    def __init__(self, entity_types: Sequence[str] = CLUENER_TYPES, head_size: int = 64):
        if len(set(entity_types)) != len(entity_types) or not entity_types:
            raise ValueError(f"entity_types must be distinct and non-empty, got {list(entity_types)}")
        self.entity_types = tuple(entity_types)
        self.head_size = head_size
        self.pad_token_id = 0  # set by ``encode`` from the tokenizer, used by ``collate``

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path) -> list[Example]:
        """Parse a CLUENER JSON Lines file. ``Example.label`` is a sorted list of (type, start, end) or None.

        Raises ``DataError`` (file:line) for a bad JSON line, a missing or empty ``text``, a malformed ``label``, an
        unknown entity type, or a span that is out of range or whose text is not ``text[start:end + 1]``.
        """
        examples: list[Example] = []
        for line_no, record in iter_json_lines(path):
            text = record.get("text")
            if not isinstance(text, str) or not text:
                raise DataError(path, line_no, 'missing or empty "text"')
            label = self._parse_label(record["label"], text, path, line_no) if "label" in record else None
            uid = record.get("id", len(examples))
            examples.append(Example(uid=uid, fields={"text": text}, label=label, source=f"{path}:{line_no}"))
        return examples

    def _parse_label(self, label: Any, text: str, path: str | Path, line_no: int) -> list[Span]:
        if not isinstance(label, dict):
            raise DataError(
                path, line_no, f'"label" must be an object {{type: {{entity: [[start, end]]}}}}: {label!r}'
            )
        spans: set[Span] = set()
        for entity_type, entities in label.items():
            if entity_type not in self.entity_types:
                raise DataError(
                    path, line_no, f"unknown entity type {entity_type!r} (known: {list(self.entity_types)})"
                )
            if not isinstance(entities, dict):
                raise DataError(path, line_no, f'"label.{entity_type}" must be an object {{entity: [[start, end]]}}')
            for entity, pairs in entities.items():
                if not isinstance(pairs, list):
                    raise DataError(path, line_no, f"spans of {entity_type} {entity!r} must be a list of [start, end]")
                for pair in pairs:
                    ok = isinstance(pair, list) and len(pair) == 2
                    ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                    if not ok or not 0 <= pair[0] <= pair[1] < len(text):
                        raise DataError(
                            path, line_no, f"bad span {pair!r} for {entity_type} {entity!r} in a {len(text)}-char text"
                        )
                    start, end = pair
                    if text[start : end + 1] != entity:
                        raise DataError(
                            path,
                            line_no,
                            f"span [{start}, {end}] of {entity_type} is {text[start : end + 1]!r}, not {entity!r}",
                        )
                    spans.add((entity_type, start, end))
        return sorted(spans, key=lambda s: (s[1], s[2], self.entity_types.index(s[0])))

    # ------------------------------------------------------------------ features
    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        """One feature per example: ids, mask, each token's character span, targets and the unencoded count.

        Raises ``ValueError`` if the tokenizer is not a fast tokenizer (offsets are needed).
        """
        if not tokenizer.is_fast:
            raise ValueError("NER needs a fast tokenizer (it maps tokens to characters with offset_mapping)")
        self.pad_token_id = tokenizer.pad_token_id or 0
        type_index = {name: i for i, name in enumerate(self.entity_types)}
        features = []
        for index, example in enumerate(examples):
            text = example.fields["text"]
            encoding = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
            ids = encoding["input_ids"]
            keep = [sequence == 0 for sequence in encoding.sequence_ids()]
            spans = token_char_spans(encoding["offset_mapping"], keep, text, tokenizer.convert_ids_to_tokens(ids))
            labels, unencoded = None, 0
            if example.label is not None:
                start_token = {span[0]: i for i, span in enumerate(spans) if span}
                end_token = {span[1] - 1: i for i, span in enumerate(spans) if span}
                labels = []
                for entity_type, start, end in example.label:
                    i, j = start_token.get(start), end_token.get(end)
                    if i is None or j is None or j < i:
                        unencoded += 1
                    else:
                        labels.append([type_index[entity_type], i, j])
            features.append(
                {
                    "example_index": index,
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "char_spans": [list(span) if span else None for span in spans],
                    "labels": labels,
                    "unencoded": unencoded,
                }
            )
        return features

    def collate(self, features: list[dict]) -> Batch:
        """Right-pad to the longest feature. Targets: ``span_mask`` (B, T) tokens that carry characters, and
        ``labels`` (B, types, T, T) 0/1 when every feature is labelled."""
        ids = [f["input_ids"] for f in features]
        input_ids, attention_mask = pad(ids, self.pad_token_id), pad([[1] * len(i) for i in ids])
        span_mask = pad([[span is not None for span in f["char_spans"]] for f in features]).bool()
        length = input_ids.shape[1]
        targets = {"span_mask": span_mask}
        if all(f["labels"] is not None for f in features):
            labels = torch.zeros((len(features), len(self.entity_types), length, length))
            for b, feature in enumerate(features):
                for entity_type, i, j in feature["labels"]:
                    labels[b, entity_type, i, j] = 1.0
            targets["labels"] = labels
        return Batch(inputs={"input_ids": input_ids, "attention_mask": attention_mask}, targets=targets)

    # ------------------------------------------------------------------ model
    def build_head(self, config: PretrainedConfig) -> GlobalPointer:
        return GlobalPointer(config.hidden_size, heads=len(self.entity_types), head_size=self.head_size)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Multilabel categorical CE averaged over (example, type). Raises ``KeyError`` for an unlabelled batch."""
        return global_pointer_loss(logits, batch.targets["labels"])

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[list[tuple[int, int, int]]]:
        """Per feature, the (type index, start token, end token) triples with score > 0, start <= end, and both
        tokens carrying characters."""
        length = logits.shape[-1]
        mask = batch.targets["span_mask"].to(logits.device)
        valid = mask[:, None, :, None] & mask[:, None, None, :]
        valid = valid & torch.ones(length, length, dtype=torch.bool, device=logits.device).triu()
        hits = (logits > 0) & valid
        return [[tuple(hit) for hit in hits[b].nonzero().tolist()] for b in range(hits.shape[0])]

    # ------------------------------------------------------------------ evaluation
    def _predicted_spans(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[set]:
        spans: list[set[Span]] = [set() for _ in examples]
        for feature, prediction in zip(features, predictions, strict=True):
            char_spans = feature["char_spans"]
            for entity_type, i, j in prediction:
                spans[feature["example_index"]].add(
                    (self.entity_types[entity_type], char_spans[i][0], char_spans[j][1] - 1)
                )
        return spans

    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        """Entity-level micro ``precision``, ``recall``, ``f1`` and ``f1_<type>`` over character spans (fractions),
        plus ``unencoded``: gold entities the encoding could not represent (already counted as misses).

        Raises ``ValueError`` if an example has no gold label.
        """
        counts = {name: [0, 0, 0] for name in self.entity_types}  # true positives, predicted, gold
        for example, predicted in zip(examples, self._predicted_spans(examples, features, predictions), strict=True):
            if example.label is None:
                raise ValueError(f"{example.source}: cannot score an example without a label")
            gold = set(example.label)
            for entity_type, _, _ in predicted & gold:
                counts[entity_type][0] += 1
            for entity_type, _, _ in predicted:
                counts[entity_type][1] += 1
            for entity_type, _, _ in gold:
                counts[entity_type][2] += 1
        tp, predicted, gold = (sum(c[k] for c in counts.values()) for k in range(3))
        result = {
            "precision": tp / predicted if predicted else 0.0,
            "recall": tp / gold if gold else 0.0,
            "f1": _f1(tp, predicted, gold),
        }
        result.update({f"f1_{name}": _f1(*counts[name]) for name in self.entity_types})
        result["unencoded"] = float(sum(f["unencoded"] for f in features))
        return result

    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        """``{"id": ..., "label": {type: {entity: [[start, end], ...]}}}`` per example, in example order."""
        records = []
        for example, spans in zip(examples, self._predicted_spans(examples, features, predictions), strict=True):
            text = example.fields["text"]
            label: dict[str, dict[str, list[list[int]]]] = {}
            for entity_type, start, end in sorted(spans, key=lambda s: (self.entity_types.index(s[0]), s[1], s[2])):
                label.setdefault(entity_type, {}).setdefault(text[start : end + 1], []).append([start, end])
            records.append({"id": example.uid, "label": label})
        return records


def _f1(true_positives: int, predicted: int, gold: int) -> float:
    """2PR / (P + R) = 2TP / (predicted + gold); 0 when there is nothing predicted and nothing to find."""
    return 2 * true_positives / (predicted + gold) if predicted + gold else 0.0
