"""Multiple choice: C3 (reading comprehension) and CHID (idiom cloze), as the paper's code builds them.

Every choice is its own sequence; one feature packs a question's C choices, collated to (B, C, T). The task model
flattens them to (B*C, T), the head scores each [CLS] vector with Linear(H, 1), and the logits come back as (B, C).
Loss: cross-entropy over the choices (padded choice slots masked out). Metric: accuracy.

C3, per choice (bert4keras ``truncate_sequences(512, -2, choice, question, passage)``):

    [CLS] passage [SEP] question [SEP] choice [SEP]      passage = the document's turns / sentences joined by "||"

  the last token of the longest part is popped until it fits (lengths count each part's special tokens; ties go to
  the choice, then the question). Questions with fewer than 4 choices get "无效答案" ("invalid answer") choices.

CHID, per candidate idiom of one blank:

    [CLS] idiom [SEP] left-context [unused1] right-context [SEP]       (max_length 64 in the paper)

  other blanks of the same passage become 4 x [MASK]; the contexts are trimmed from their outer ends, from the longer
  side, until the sequence fits. The paper trims characters; this trims tokens, which is the same for a character-level
  Chinese vocabulary and always fits for other tokenizers. At evaluation the blanks of one line share its candidates:
  the blanks x candidates score matrix is assigned one-to-one (``scipy.optimize.linear_sum_assignment``), as in the
  paper's code. FewCLUE's CHID has exactly one blank per line (7 candidates), so there the assignment is the argmax.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fltuning.tasks.base import Batch, DataError, Example, Task, TaskHead, head_linear, iter_json_lines
from fltuning.tasks.classification import (
    accuracy,
    predictions_by_example,
    require_text,
    special_tokens,
    tokenize,
    truncate_longest,
)

BLANK = re.compile(r"#idiom\d*#")  # FewCLUE writes "#idiom#", CLUE "#idiom000123#"


class MultipleChoiceHead(TaskHead):
    """Pooled vector of each choice (B*C, H) -> one score per choice (B*C,)."""

    pooled = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = head_linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dense(hidden).squeeze(-1)


class MultipleChoiceTask(Task):
    """What C3 and CHID share: features ``{"input_ids": [ids of each choice], "example_index", "label"?}``."""

    kind = "multiple_choice"
    metric = "accuracy"

    def collate(self, features: list[dict]) -> Batch:
        """(B, C, T) ``input_ids`` / ``attention_mask``; ``choice_mask`` (B, C) marks real choices. A padded choice
        slot attends to one padding token so that no sequence is fully masked."""
        num_choices = max(len(f["input_ids"]) for f in features)
        length = max(len(ids) for f in features for ids in f["input_ids"])
        input_ids = torch.zeros(len(features), num_choices, length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        choice_mask = torch.zeros(len(features), num_choices, dtype=torch.bool)
        for b, feature in enumerate(features):
            attention_mask[b, :, 0] = 1
            for c, ids in enumerate(feature["input_ids"]):
                input_ids[b, c, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                attention_mask[b, c, : len(ids)] = 1
                choice_mask[b, c] = True
        targets = {"choice_mask": choice_mask}
        if all("label" in f for f in features):
            targets["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return Batch(inputs={"input_ids": input_ids, "attention_mask": attention_mask}, targets=targets)

    def build_head(self, config: PretrainedConfig) -> MultipleChoiceHead:
        return MultipleChoiceHead(config.hidden_size)

    @staticmethod
    def masked(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        mask = batch.targets.get("choice_mask")
        if mask is None:
            return logits.float()
        return logits.float().masked_fill(~mask.to(logits.device), torch.finfo(torch.float32).min)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if "labels" not in batch.targets:
            raise ValueError("this batch has no labels (unlabelled examples cannot be trained on)")
        return F.cross_entropy(self.masked(logits, batch), batch.targets["labels"])


class C3Task(MultipleChoiceTask):
    """C3: read from the official JSON files (a list of ``[sentences, questions, document id]``).

    ``read`` takes one file or a list of files (the paper trains on m-train + d-train and evaluates on m-dev +
    d-dev). The submission id is the question's ``id`` when the file has one, else its 0-based position over all the
    files read together."""

    def __init__(self, name: str = "c3", num_choices: int = 4, pad_choice: str = "无效答案", joiner: str = "||"):
        self.name, self.num_choices, self.pad_choice, self.joiner = name, num_choices, pad_choice, joiner

    def read(self, path: str | Path | Sequence[str | Path]) -> list[Example]:
        paths = [path] if isinstance(path, str | Path) else list(path)
        examples: list[Example] = []
        for file in paths:
            examples.extend(self._read_file(Path(file), len(examples)))
        return examples

    def _read_file(self, path: Path, first_position: int) -> list[Example]:
        if not path.is_file():
            raise DataError(path, None, "file not found")
        try:
            documents = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise DataError(path, err.lineno, f"not valid JSON ({err.msg})") from err
        if not isinstance(documents, list):
            raise DataError(path, None, "expected a JSON list of [sentences, questions, id] documents")
        examples = []
        for d, document in enumerate(documents):
            if not (isinstance(document, list) and len(document) >= 2 and isinstance(document[0], list)):
                raise DataError(path, None, f"document {d}: expected [sentences, questions, id]")
            doc_id = document[2] if len(document) > 2 else d
            where = f"document {d} (id {doc_id})"
            sentences, questions = document[0], document[1]
            if not all(isinstance(s, str) for s in sentences) or not "".join(sentences).strip():
                raise DataError(path, None, f"{where}: empty passage or a non-string sentence")
            if not isinstance(questions, list) or not questions:
                raise DataError(path, None, f"{where}: expected a non-empty list of questions")
            passage = self.joiner.join(sentences)
            for q, qa in enumerate(questions):
                here = f"{where}, question {q}"
                if not isinstance(qa, dict):
                    raise DataError(path, None, f"{here}: expected an object with question / choice / answer")
                question = qa.get("question")
                if not isinstance(question, str) or not question.strip():
                    raise DataError(path, None, f"{here}: missing or empty field 'question'")
                choices = qa.get("choice")
                if not isinstance(choices, list) or not choices:
                    raise DataError(path, None, f"{here}: missing or empty field 'choice'")
                if not all(isinstance(c, str) and c.strip() for c in choices):
                    raise DataError(path, None, f"{here}: empty or non-string choice in {choices}")
                if len(choices) > self.num_choices:
                    raise DataError(path, None, f"{here}: {len(choices)} choices, more than {self.num_choices}")
                label = None
                if qa.get("answer") is not None:
                    if qa["answer"] not in choices:
                        raise DataError(path, None, f"{here}: answer {qa['answer']!r} is not one of {choices}")
                    label = choices.index(qa["answer"])  # the first one when a choice is repeated, as the paper
                padded = choices + [self.pad_choice] * (self.num_choices - len(choices))
                uid = qa.get("id", first_position + len(examples))
                fields = {"passage": passage, "question": question, "choices": padded}
                examples.append(Example(uid=uid, fields=fields, label=label, source=f"{path}: {here}"))
        return examples

    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        start, sep = special_tokens(tokenizer)
        passages = sorted({e.fields["passage"] for e in examples})
        passage_ids = dict(zip(passages, tokenize(tokenizer, passages), strict=True))
        question_ids = tokenize(tokenizer, [e.fields["question"] for e in examples])
        choice_ids = tokenize(tokenizer, [c for e in examples for c in e.fields["choices"]])
        budget = max_length - len(start) - 3 * len(sep)
        if budget < 3:
            raise ValueError(f"max_length={max_length} leaves no room for passage, question and choice")
        bias = [len(sep), len(sep), len(start) + len(sep)]  # choice, question, passage: as bert4keras counts them
        features, offset = [], 0
        for i, example in enumerate(examples):
            sequences = []
            for _ in example.fields["choices"]:
                parts = [list(choice_ids[offset]), list(question_ids[i]), list(passage_ids[example.fields["passage"]])]
                offset += 1
                choice, question, passage = truncate_longest(parts, budget, bias)
                sequences.append(start + passage + sep + question + sep + choice + sep)
            feature = {"input_ids": sequences, "example_index": i}
            if example.label is not None:
                feature["label"] = example.label
            features.append(feature)
        return features

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[int]:
        return self.masked(logits, batch).argmax(dim=-1).tolist()

    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        predicted = predictions_by_example(examples, features, predictions)
        pairs = [(p, e.label) for p, e in zip(predicted, examples, strict=True) if e.label is not None]
        if not pairs:
            raise ValueError(f"task {self.name!r}: no labelled examples to score")
        return {"accuracy": accuracy([p for p, _ in pairs], [g for _, g in pairs])}

    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        """CLUE's C3 format, as the paper's code writes it: ``{"id": ..., "label": "<choice index>"}``."""
        predicted = predictions_by_example(examples, features, predictions)
        return [{"id": e.uid, "label": str(p)} for e, p in zip(examples, predicted, strict=True)]


def assign_blanks(scores: np.ndarray) -> list[int]:
    """One candidate per blank, each candidate used at most once, maximising the total score
    (``linear_sum_assignment`` on the negated blanks x candidates matrix). Blanks beyond the number of candidates,
    which cannot all get distinct candidates, fall back to their own best candidate."""
    scores = np.asarray(scores, dtype=np.float64)
    chosen = scores.argmax(axis=1)
    rows, cols = linear_sum_assignment(-scores)
    chosen[rows] = cols
    return chosen.tolist()


class CHIDTask(MultipleChoiceTask):
    """CHID idiom cloze. Reads FewCLUE lines ``{"id", "candidates", "content": "...#idiom#...", "answer"}`` (one blank
    per line) and CLUE lines ``{"candidates", "content": [passages with #idiom000123#]}`` whose answers are in the
    sibling file ``<stem>_answer.json`` (``{"#idiom000123#": index}``; absent for unlabelled test files).

    ``blank_token`` marks the target blank when the tokenizer has it (else its mask token); the other blanks become
    ``other_blank_length`` mask tokens. Decoded predictions are the candidates' scores; ``score`` and ``submission``
    assign them per line with ``assign_blanks``."""

    def __init__(self, name: str = "chid", blank_token: str = "[unused1]", other_blank_length: int = 4):
        self.name, self.blank_token, self.other_blank_length = name, blank_token, other_blank_length

    def read(self, path: str | Path) -> list[Example]:
        path = Path(path)
        answers_path = path.with_name(f"{path.stem}_answer.json")
        answers = None
        examples = []
        for line, record in iter_json_lines(path):
            candidates = record.get("candidates")
            if not isinstance(candidates, list) or not candidates:
                raise DataError(path, line, "missing or empty field 'candidates'")
            if not all(isinstance(c, str) and c.strip() for c in candidates):
                raise DataError(path, line, f"empty or non-string candidate in {candidates}")
            content = record.get("content")
            group = f"{path}:{line}"
            if isinstance(content, str):  # FewCLUE: one blank, answer on the line
                text = require_text(record, "content", path, line)
                if len(BLANK.findall(text)) != 1:
                    raise DataError(
                        path, line, f"expected exactly one #idiom# blank, found {len(BLANK.findall(text))}"
                    )
                label = record.get("answer")
                if label is not None and (
                    not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(candidates)
                ):
                    raise DataError(path, line, f"answer {label!r} is not a candidate index 0..{len(candidates) - 1}")
                uid = record.get("id", len(examples))
                examples.append(self._example(uid, BLANK.split(text), 0, candidates, label, group))
            elif isinstance(content, list) and content:  # CLUE: several passages, several blanks each
                if answers is None and answers_path.is_file():
                    answers = _read_answers(answers_path)
                for passage in content:
                    if not isinstance(passage, str) or not passage.strip():
                        raise DataError(path, line, "empty or non-string passage in 'content'")
                    keys = BLANK.findall(passage)
                    if not keys:
                        raise DataError(path, line, f"a passage has no #idiom# blank: {passage[:40]!r}")
                    segments = BLANK.split(passage)
                    for k, key in enumerate(keys):
                        label = None
                        if answers is not None:
                            if key not in answers:
                                raise DataError(answers_path, None, f"no answer for {key} (from {path}:{line})")
                            label = answers[key]
                            if not 0 <= label < len(candidates):
                                raise DataError(answers_path, None, f"answer {label} for {key} is not a candidate")
                        examples.append(self._example(key, segments, k, candidates, label, group))
            else:
                raise DataError(path, line, "field 'content' must be a text or a non-empty list of texts")
        return examples

    @staticmethod
    def _example(uid: Any, segments: list[str], blank: int, candidates: list[str], label: Any, group: str) -> Example:
        fields = {"segments": segments, "blank": blank, "candidates": candidates, "group": group}
        return Example(uid=uid, fields=fields, label=label, source=group)

    def _blank_ids(self, tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
        mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
        blank = (
            tokenizer.convert_tokens_to_ids(self.blank_token) if self.blank_token in tokenizer.get_vocab() else mask
        )
        if blank is None or mask is None:
            raise ValueError(f"tokenizer has neither {self.blank_token!r} nor a mask / unknown token to mark blanks")
        return blank, mask

    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        start, sep = special_tokens(tokenizer)
        blank_id, mask_id = self._blank_ids(tokenizer)
        masks = [mask_id] * self.other_blank_length
        segment_ids = iter(tokenize(tokenizer, [s for e in examples for s in e.fields["segments"]]))
        candidate_ids = iter(tokenize(tokenizer, [c for e in examples for c in e.fields["candidates"]]))
        features = []
        for i, example in enumerate(examples):
            segments = [list(next(segment_ids)) for _ in example.fields["segments"]]
            candidates = [list(next(candidate_ids)) for _ in example.fields["candidates"]]
            k = example.fields["blank"]
            budget = max_length - len(start) - 2 * len(sep) - max(len(c) for c in candidates) - 1
            if budget < 0:
                raise ValueError(f"max_length={max_length} cannot hold an idiom and the blank marker")
            left, right = trim_context(segments[: k + 1], segments[k + 1 :], budget, len(masks))
            context = _join(left, masks) + [blank_id] + _join(right, masks) + sep
            feature = {"input_ids": [start + c + sep + context for c in candidates], "example_index": i}
            if example.label is not None:
                feature["label"] = example.label
            features.append(feature)
        return features

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[list[float]]:
        counts = batch.targets["choice_mask"].sum(dim=1).tolist() if "choice_mask" in batch.targets else None
        rows = logits.float().tolist()
        return [row[:n] for row, n in zip(rows, counts, strict=True)] if counts else rows

    def assign(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[int]:
        """The chosen candidate of every example, assigned one-to-one among the blanks of each line."""
        scores = predictions_by_example(examples, features, predictions)
        groups: dict[str, list[int]] = {}
        for i, example in enumerate(examples):
            groups.setdefault(example.fields["group"], []).append(i)
        chosen = [0] * len(examples)
        for members in groups.values():
            for i, c in zip(members, assign_blanks(np.array([scores[i] for i in members])), strict=True):
                chosen[i] = c
        return chosen

    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        chosen = self.assign(examples, features, predictions)
        pairs = [(c, e.label) for c, e in zip(chosen, examples, strict=True) if e.label is not None]
        if not pairs:
            raise ValueError(f"task {self.name!r}: no labelled examples to score")
        return {"accuracy": accuracy([c for c, _ in pairs], [g for _, g in pairs])}

    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        """``{"id": ..., "answer": <candidate index>}`` per blank (FewCLUE's format; CLUE's CHID file is the single
        object ``{id: answer}`` made from these records)."""
        chosen = self.assign(examples, features, predictions)
        return [{"id": e.uid, "answer": c} for e, c in zip(examples, chosen, strict=True)]


def trim_context(left: list[list[int]], right: list[list[int]], budget: int, mask_length: int) -> tuple[list, list]:
    """Trim the segments left and right of a blank until they and the masks between them fit ``budget`` tokens.

    As the paper's ``sample_split``: while too long, cut from the longer side (the right one on ties) at its outer
    end: the first token of the leftmost segment or the last token of the rightmost one; a segment down to one token
    is dropped with its blank's masks."""
    left, right = [list(s) for s in left], [list(s) for s in right]
    while True:
        size_left, size_right = sum(map(len, left)), sum(map(len, right))
        num_masks = max(len(left) - 1, 0) + max(len(right) - 1, 0)
        if size_left + size_right + mask_length * num_masks <= budget:
            return left, right
        if size_left > size_right:
            if len(left[0]) > 1:
                left[0] = left[0][1:]
            else:
                left = left[1:]
        elif right:
            if len(right[-1]) > 1:
                right[-1] = right[-1][:-1]
            else:
                right = right[:-1]
        else:
            raise ValueError(f"cannot fit the context into {budget} tokens")


def _join(segments: list[list[int]], masks: list[int]) -> list[int]:
    out: list[int] = []
    for i, segment in enumerate(segments):
        if i:
            out.extend(masks)
        out.extend(segment)
    return out


def _read_answers(path: Path) -> dict[str, int]:
    try:
        answers = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise DataError(path, err.lineno, f"not valid JSON ({err.msg})") from err
    if not isinstance(answers, dict) or not all(isinstance(v, int) for v in answers.values()):
        raise DataError(path, None, 'expected one JSON object {"#idiom000123#": candidate index, ...}')
    return answers
