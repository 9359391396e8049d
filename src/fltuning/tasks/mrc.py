"""CMRC 2018 span-extraction reading comprehension with a one-head GlobalPointer, scored by the official scorer.

Data: SQuAD v1.1 JSON (``data`` -> ``paragraphs`` -> ``qas``). Pipeline (the paper's ``cmrc2018.py``):

- ``encode``: ``[CLS] question [SEP] context-window [SEP]``. Long contexts are cut into token windows that share
  ``stride`` tokens with the next one (Hugging Face's ``stride``: the *overlap*, 128 by default). The paper's code
  instead starts a window every 128 characters (overlap = window - 128): ``window_step=128`` does that in tokens
  (1,722 windows instead of 1,438 for the trial file at ``max_length=512``). An answer longer than the overlap can
  straddle two windows and fit in neither: one of the 1,002 trial questions with the default, none with
  ``window_step=128``. The question is clipped to ``max_question_tokens``. A window's label is the token span of
  the first answer it fully contains, else (0, 0), the [CLS] span ("no answer here"). An answer starting or ending
  inside a token is widened to the whole token.
- ``build_head``: ``GlobalPointer(heads=1, head_size=64)``. Only [CLS] and context tokens that carry characters
  may be span ends; (0, 0) is the only span that uses [CLS]. ``loss``: softmax cross-entropy over all allowed
  upper-triangular spans of a window.
- ``decode``: per window, the best context span (row and column 0 excluded, at most ``max_answer_tokens`` tokens)
  with its score. ``score``/``submission``: per question, the best-scoring window's span, cut from the original
  context by character offsets.
- ``score``: the official CMRC 2018 scorer (``cmrc_metric``), in percent: ``em``, ``f1``, ``average``. The
  selection ``metric`` is ``"em"``, the CLUE leaderboard's metric and the closest to the paper's own dev criterion
  (exact equality of token spans); ``f1`` is returned too for whoever selects on it.

Answers in the data: an ``answer_start`` that does not point at its text is moved to the nearest occurrence of the
text (the trial file has 5 such off-by-one starts after characters outside the Basic Multilingual Plane); an answer
with ``answer_start == -1`` whose text is not in the context (193 in dev) is kept for scoring but never labelled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fltuning.tasks.base import Batch, DataError, Example, Task, pad
from fltuning.tasks.cmrc_metric import evaluate
from fltuning.tasks.global_pointer import MASK_VALUE, GlobalPointer, token_char_spans


class MRCTask(Task):
    """CMRC 2018 (any SQuAD-v1.1-format data): sliding windows, GlobalPointer span, official EM/F1.

    ``submission`` returns ``{"id": question_id, "answer": text}`` records in example order; the official prediction
    file is one JSON object built from them: ``json.dump({r["id"]: r["answer"] for r in records}, f,
    ensure_ascii=False)`` (CLUE's ``cmrc2018_predict.json``).
    """

    kind = "mrc"
    metric = "em"

    def __init__(
        self,
        stride: int = 128,
        window_step: int | None = None,
        max_question_tokens: int = 64,
        max_answer_tokens: int = 64,
        head_size: int = 64,
    ):
        if stride < 0 or (window_step is not None and window_step < 1):
            raise ValueError(f"need stride >= 0 and window_step >= 1 (or None); got {stride}, {window_step}")
        if max_question_tokens < 1 or max_answer_tokens < 1:
            raise ValueError(
                f"max_question_tokens and max_answer_tokens must be >= 1; got {max_question_tokens}, "
                f"{max_answer_tokens}"
            )
        self.stride, self.window_step = stride, window_step
        self.max_question_tokens, self.max_answer_tokens = max_question_tokens, max_answer_tokens
        self.head_size = head_size
        self.pad_token_id = 0  # set by ``encode`` from the tokenizer, used by ``collate``

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path) -> list[Example]:
        """Parse a SQuAD-v1.1 JSON file into one example per question.

        ``Example.uid`` is the question id, ``fields`` holds ``question`` and ``context``, ``label`` is a list of
        ``{"text", "start"}`` answers (``start`` None when the text is not in the context) or None when the
        question has no answers (test data). Raises ``DataError`` for bad JSON, a missing field, an empty context
        or answer, a duplicate id, or an answer with an ``answer_start`` other than -1 whose text is nowhere in the
        context. Empty questions are kept (the trial file has two; the official scorer counts them).
        """
        try:
            raw = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise DataError(path, None, "file not found") from None
        except UnicodeDecodeError as error:
            raise DataError(path, None, f"not UTF-8 text ({error})") from None
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataError(path, error.lineno, f"bad JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(document, dict) or not isinstance(document.get("data"), list):
            raise DataError(path, 1, 'expected a SQuAD-style object with a "data" list')
        examples: list[Example] = []
        seen: set[str] = set()
        id_lines = _id_lines(raw)
        for a, article in enumerate(document["data"]):
            paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
            if not isinstance(paragraphs, list):
                raise DataError(path, None, f'data[{a}]: missing "paragraphs" list')
            for p, paragraph in enumerate(paragraphs):
                where = f"data[{a}].paragraphs[{p}]"
                context = paragraph.get("context") if isinstance(paragraph, dict) else None
                if not isinstance(context, str) or not context.strip():
                    raise DataError(path, None, f'{where}: missing or empty "context"')
                if not isinstance(paragraph.get("qas"), list):
                    raise DataError(path, None, f'{where}: missing "qas" list')
                for q, qa in enumerate(paragraph["qas"]):
                    examples.append(self._parse_question(qa, context, f"{where}.qas[{q}]", path, id_lines, seen))
        return examples

    def _parse_question(
        self, qa: Any, context: str, where: str, path: str | Path, id_lines: dict[str, int], seen: set[str]
    ) -> Example:
        qid = qa.get("id") if isinstance(qa, dict) else None
        line = id_lines.get(qid) if isinstance(qid, str) else None
        if not isinstance(qid, str) or not qid:
            raise DataError(path, line, f'{where}: missing question "id"')
        if qid in seen:
            raise DataError(path, line, f"{where}: duplicate question id {qid!r}")
        seen.add(qid)
        question = qa.get("question")
        if not isinstance(question, str):  # an empty question is allowed: the trial file has 2, the scorer counts them
            raise DataError(path, line, f'{where} (id {qid}): missing "question"')
        answers = qa.get("answers") or None
        label = None
        if answers is not None:
            if not isinstance(answers, list):
                raise DataError(path, line, f'{where} (id {qid}): "answers" must be a list')
            label = []
            for answer in answers:
                text = answer.get("text") if isinstance(answer, dict) else None
                start = answer.get("answer_start") if isinstance(answer, dict) else None
                if not isinstance(text, str) or not text.strip() or not isinstance(start, int):
                    raise DataError(path, line, f'{where} (id {qid}): an answer needs a "text" and an "answer_start"')
                located = _locate(context, text, start)
                if located is None and start != -1:
                    raise DataError(path, line, f"{where} (id {qid}): answer {text!r} is not in the context")
                label.append({"text": text, "start": located})
        return Example(
            uid=qid, fields={"question": question, "context": context}, label=label, source=f"{path}:{line}"
        )

    # ------------------------------------------------------------------ features
    def encode(self, examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
        """Windows of each example: ids, mask, ``span_mask`` ([CLS] + context tokens with characters), each token's
        ``char_spans`` in the context, and ``label`` [start token, end token] ([0, 0] when the window does not fully
        contain an answer; None for unlabelled examples).

        Raises ``ValueError`` for a slow tokenizer, or when ``max_length`` leaves no more than ``stride`` (or fewer
        than ``window_step``) context tokens per window.
        """
        if not tokenizer.is_fast:
            raise ValueError("MRC needs a fast tokenizer (it maps tokens to characters with offset_mapping)")
        self.pad_token_id = tokenizer.pad_token_id or 0
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        features = []
        for index, example in enumerate(examples):
            question, context = self._clip_question(example.fields["question"], tokenizer), example.fields["context"]
            room = max_length - specials - len(tokenizer(question, add_special_tokens=False)["input_ids"])
            overlap = self.stride if self.window_step is None else room - self.window_step
            if not 0 <= overlap < room:
                setting = f"stride={self.stride}" if self.window_step is None else f"window_step={self.window_step}"
                raise ValueError(
                    f"max_length={max_length} leaves {room} context tokens per window after the question of "
                    f"{example.source}; raise max_length or lower {setting} / max_question_tokens"
                )
            encoding = tokenizer(
                question,
                context,
                truncation="only_second",
                max_length=max_length,
                stride=overlap,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            for w, ids in enumerate(encoding["input_ids"]):
                keep = [sequence == 1 for sequence in encoding.sequence_ids(w)]
                tokens = tokenizer.convert_ids_to_tokens(ids)
                spans = token_char_spans(encoding["offset_mapping"][w], keep, context, tokens)
                features.append(
                    {
                        "example_index": index,
                        "input_ids": ids,
                        "attention_mask": [1] * len(ids),
                        "span_mask": [1] + [int(span is not None) for span in spans[1:]],
                        "char_spans": [list(span) if span else None for span in spans],
                        "label": None if example.label is None else _window_label(spans, example.label),
                    }
                )
        return features

    def _clip_question(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
        encoding = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) <= self.max_question_tokens:
            return question
        return question[: encoding["offset_mapping"][self.max_question_tokens - 1][1]]

    def collate(self, features: list[dict]) -> Batch:
        """Right-pad. Targets: ``span_mask`` (B, T) and ``labels`` (B, 2) when every feature is labelled."""
        ids = [f["input_ids"] for f in features]
        input_ids, attention_mask = pad(ids, self.pad_token_id), pad([[1] * len(i) for i in ids])
        span_mask = pad([f["span_mask"] for f in features]).bool()
        targets = {"span_mask": span_mask}
        if all(f["label"] is not None for f in features):
            targets["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        return Batch(inputs={"input_ids": input_ids, "attention_mask": attention_mask}, targets=targets)

    # ------------------------------------------------------------------ model
    def build_head(self, config: PretrainedConfig) -> GlobalPointer:
        return GlobalPointer(config.hidden_size, heads=1, head_size=self.head_size)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Softmax CE of the labelled span among all allowed spans of each window (index start * T + end)."""
        scores = _allowed(logits, batch.targets["span_mask"], with_null=True)
        labels = batch.targets["labels"].to(scores.device)
        return F.cross_entropy(scores.flatten(1), labels[:, 0] * scores.shape[-1] + labels[:, 1])

    def decode(self, logits: torch.Tensor, batch: Batch) -> list[tuple[int, int, float] | None]:
        """Per window, the best (start token, end token, score) among context spans of at most
        ``max_answer_tokens`` tokens; None if the window has no context token."""
        scores = _allowed(logits, batch.targets["span_mask"], with_null=False)
        length = scores.shape[-1]
        positions = torch.arange(length, device=scores.device)
        too_long = positions[None, :] - positions[:, None] >= self.max_answer_tokens
        scores = scores.masked_fill(too_long, -MASK_VALUE)
        best, flat = scores.flatten(1).max(dim=-1)
        return [
            (f // length, f % length, s) if s > -MASK_VALUE / 2 else None
            for f, s in zip(flat.tolist(), best.tolist(), strict=True)
        ]

    # ------------------------------------------------------------------ evaluation
    def _answers(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[str | None]:
        """Per example, the text of its best-scoring window's span (None if no window produced one)."""
        best: list[tuple[float, str] | None] = [None] * len(examples)
        for feature, prediction in zip(features, predictions, strict=True):
            if prediction is None:
                continue
            start, end, value = prediction
            index = feature["example_index"]
            if best[index] is None or value > best[index][0]:
                spans = feature["char_spans"]
                best[index] = (value, examples[index].fields["context"][spans[start][0] : spans[end][1]])
        return [None if b is None else b[1] for b in best]

    def score(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> dict[str, float]:
        """The official CMRC 2018 ``em``, ``f1`` and ``average`` (percent) over all examples, with ``total`` and
        ``skip`` (questions without a predicted span, scored 0). Raises ``ValueError`` for an unlabelled example."""
        references, answered = {}, {}
        for example, answer in zip(examples, self._answers(examples, features, predictions), strict=True):
            if example.label is None:
                raise ValueError(f"{example.source}: cannot score question {example.uid!r} without answers")
            references[example.uid] = [a["text"] for a in example.label]
            if answer is not None:
                answered[example.uid] = answer
        return evaluate(references, answered)

    def submission(self, examples: list[Example], features: list[dict], predictions: list[Any]) -> list[dict]:
        """``{"id": question_id, "answer": text}`` per example, in example order ("" when no span was found)."""
        answers = self._answers(examples, features, predictions)
        return [{"id": example.uid, "answer": answer or ""} for example, answer in zip(examples, answers, strict=True)]


def _allowed(logits: torch.Tensor, span_mask: torch.Tensor, with_null: bool) -> torch.Tensor:
    """(B, 1, T, T) scores -> (B, T, T) float scores with every disallowed span at -1e12: both ends must be in
    ``span_mask`` and start <= end; the [CLS] row and column only as (0, 0), and only ``with_null``."""
    scores = logits[:, 0].float()
    mask = span_mask.to(device=scores.device, dtype=torch.bool)
    allowed = (mask[:, :, None] & mask[:, None, :]).triu()
    allowed[:, 0, :] = False
    allowed[:, :, 0] = False
    if with_null:
        allowed[:, 0, 0] = True
    return scores.masked_fill(~allowed, -MASK_VALUE)


def _window_label(spans: list[tuple[int, int] | None], answers: list[dict]) -> list[int]:
    """[start token, end token] of the first answer inside the window's characters, else [0, 0]."""
    context_tokens = [i for i, span in enumerate(spans) if span is not None]
    if not context_tokens:
        return [0, 0]
    first, last = spans[context_tokens[0]][0], spans[context_tokens[-1]][1]
    for answer in answers:
        if answer["start"] is None:
            continue
        start, end = answer["start"], answer["start"] + len(answer["text"])
        if first <= start and end <= last:
            i = next(i for i in context_tokens if spans[i][1] > start)
            j = next(j for j in reversed(context_tokens) if spans[j][0] < end)
            if i <= j:
                return [i, j]
    return [0, 0]


def _locate(context: str, text: str, start: int) -> int | None:
    """``start`` if the answer text is there, else the nearest occurrence of the text, else None."""
    if start >= 0 and context.startswith(text, start):
        return start
    occurrences, at = [], context.find(text)
    while at != -1:
        occurrences.append(at)
        at = context.find(text, at + 1)
    return min(occurrences, key=lambda o: abs(o - start)) if occurrences else None


def _id_lines(raw: str) -> dict[str, int]:
    """1-based line of the first ``"id": "..."`` with each value in the file's text, for error messages."""
    lines: dict[str, int] = {}
    line, last = 1, 0
    for match in re.finditer(r'"id"\s*:\s*"([^"\\]*)"', raw):
        line, last = line + raw.count("\n", last, match.start()), match.start()
        lines.setdefault(match.group(1), line)
    return lines
