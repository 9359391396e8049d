"""The official CMRC 2018 scorer (ymcui/cmrc2018 ``cmrc2018_evaluate.py``, v5/v6), re-implemented without NLTK.

Per question, against every reference answer, keeping the best:

- **F1**: both strings are lower-cased, stripped, cut by *mixed segmentation* (each Chinese character in
  U+4E00..U+9FA5 is one segment; each run of other characters is split into words by NLTK's ``word_tokenize``) with
  the scorer's punctuation list removed; precision and recall come from the **longest common substring** of the
  two segment lists (not SQuAD's bag-of-tokens overlap).
- **EM**: 1 if the strings are equal after lower-casing, stripping and removing the punctuation list.

``F1`` and ``EM`` are averaged over *all* reference questions in percent; a question without a prediction counts
as 0 (the official script prints "Unanswered question" and counts it in ``SKIP``). ``AVERAGE = (EM + F1) / 2``.

Known quirks of the official script, kept on purpose: the punctuation list holds only the characters below (ASCII
``,.!?()%`` are *not* removed, but word tokenisation splits them into their own segments, so they count in F1); its
entry "……" is two characters long and never matches a single character, so "…" is kept.

Difference: ``word_tokenize`` runs NLTK's Punkt sentence splitter before the Treebank-style word tokenizer; here the
word rules (quotes, clitics, the final period, ``,;@#$%&?!`` and brackets split off, commas and periods inside
numbers kept) are re-implemented and the sentence splitter is not, so inside a run of non-Chinese text only the last
period is split from its word ("a.b. c." -> ["a.b.", "c", "."]). This only matters for multi-sentence English
answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

#: The official punctuation list (``sp_char``), in its order. "……" is one entry of two characters.
PUNCTUATION = (
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
)  # fmt: skip
_PUNCTUATION_CHARS = frozenset(p for p in PUNCTUATION if len(p) == 1)
_CHINESE = re.compile(r"[\u4e00-\u9fa5]")

# Word rules of NLTK's Treebank-style tokenizer, applied in its order (text is already lower-cased).
_OPENING_QUOTE_AT_START = re.compile(r'^"')
_OPENING_QUOTE = re.compile(r'(?<=[\s(\[{<])"')
_OPENING_UNICODE_QUOTES = re.compile(r"([«“‘„])")
_CLOSING_UNICODE_QUOTES = re.compile(r"([»”’])")
_LEADING_APOSTROPHE = re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_FINAL_PERIOD = re.compile(r"([^.])(\.)([\])}>\"'»”’]*)\s*$")
_COMMA = re.compile(r",(?!\d)")  # "3,000" stays one word
_ELLIPSIS = re.compile(r"\.{2,}")
_SYMBOLS = re.compile(r"[;@#$%&?!*\u2012-\u2015\[\](){}<>]")
_TRAILING_APOSTROPHE = re.compile(r"([^'])' ")
_CLITICS = re.compile(r"([^' ])('s|'m|'d|'ll|'re|'ve|n't|') ")
_COMPOUNDS = re.compile(
    r"\b(can(?=not\b)|d(?='ye\b)|gim(?=me\b)|gon(?=na\b)|got(?=ta\b)|lem(?=me\b)|more(?='n\b)|wan(?=na\s))"
)
_TWAS = re.compile(r" ('t)(is|was)\b")


def word_tokenize(text: str) -> list[str]:
    """Split a run of non-Chinese text into words like NLTK's ``word_tokenize`` (without sentence splitting)."""
    text = _OPENING_QUOTE_AT_START.sub(" `` ", text)
    text = _OPENING_QUOTE.sub(" `` ", text)
    text = _OPENING_UNICODE_QUOTES.sub(r" \1 ", text)
    text = _LEADING_APOSTROPHE.sub("' ", text)
    text = _FINAL_PERIOD.sub(r"\1 \2 \3 ", text)
    text = _COMMA.sub(" , ", text)
    text = _ELLIPSIS.sub(r" \g<0> ", text)
    text = _SYMBOLS.sub(r" \g<0> ", text)
    text = _TRAILING_APOSTROPHE.sub(r"\1 ' ", text)
    text = _CLOSING_UNICODE_QUOTES.sub(r" \1 ", " " + text + " ").replace('"', " '' ")
    text = re.sub(r"\s+", " ", text)
    text = _CLITICS.sub(r"\1 \2 ", text)
    text = _COMPOUNDS.sub(r"\1 ", text)
    text = _TWAS.sub(r" \1 \2", text)
    return text.split()


def mixed_segmentation(text: str, remove_punctuation: bool = False) -> list[str]:
    """Chinese characters one by one, other runs word-tokenized; punctuation dropped or kept as own segments."""
    segments: list[str] = []
    run = ""
    for char in str(text).lower().strip():
        if remove_punctuation and char in _PUNCTUATION_CHARS:
            continue
        if _CHINESE.match(char) or char in _PUNCTUATION_CHARS:
            if run:
                segments.extend(word_tokenize(run))
                run = ""
            segments.append(char)
        else:
            run += char
    if run:
        segments.extend(word_tokenize(run))
    return segments


def strip_punctuation(text: str) -> str:
    """Lower-case, strip, and drop the official punctuation characters (the scorer's ``remove_punctuation``)."""
    return "".join(char for char in str(text).lower().strip() if char not in _PUNCTUATION_CHARS)


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest run of consecutive segments shared by ``a`` and ``b``."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def f1_score(references: Sequence[str], prediction: str) -> float:
    """Best LCS-based F1 (0..1) of ``prediction`` over the reference answers; 0 if there are none."""
    prediction_segments = mixed_segmentation(prediction, remove_punctuation=True)
    best = 0.0
    for reference in references:
        reference_segments = mixed_segmentation(reference, remove_punctuation=True)
        common = longest_common_substring(reference_segments, prediction_segments)
        if common:
            precision, recall = common / len(prediction_segments), common / len(reference_segments)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(references: Sequence[str], prediction: str) -> float:
    """1.0 if ``prediction`` equals any reference after ``strip_punctuation``, else 0.0."""
    return float(any(strip_punctuation(reference) == strip_punctuation(prediction) for reference in references))


def evaluate(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """The official scores in percent over every question of ``references`` (question id -> reference answers).

    Returns ``{"average", "f1", "em", "total", "skip"}``; questions missing from ``predictions`` score 0 and are
    counted in ``skip``. Raises ``ValueError`` if there are no references.
    """
    if not references:
        raise ValueError("CMRC 2018 scoring needs at least one reference question")
    f1 = em = 0.0
    skip = 0
    for question_id, answers in references.items():
        if question_id not in predictions:
            skip += 1
            continue
        prediction = str(predictions[question_id])
        f1 += f1_score(answers, prediction)
        em += exact_match(answers, prediction)
    total = len(references)
    f1, em = 100.0 * f1 / total, 100.0 * em / total
    return {"average": (em + f1) / 2, "f1": f1, "em": em, "total": float(total), "skip": float(skip)}
