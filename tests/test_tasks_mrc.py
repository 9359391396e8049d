"""CMRC 2018: the official scorer equals hand-computed values, windows overlap by the stride and carry the right
answer spans, a hand-made score matrix decodes to the exact answer text, the loss is the softmax CE over allowed
spans, a tiny BERT runs end to end, and the real trial / dev files parse."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_bert_config

from fltuning.tasks.base import DataError
from fltuning.tasks.cmrc_metric import evaluate, exact_match, f1_score, mixed_segmentation
from fltuning.tasks.model import TaskModel
from fltuning.tasks.mrc import MRCTask

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- official scorer


def test_scorer_exact_match():
    assert f1_score(["北京大学"], "北京大学") == 1.0 and exact_match(["北京大学"], "北京大学") == 1.0


def test_scorer_partial_overlap_uses_longest_common_substring():
    # [北 京 大 学] vs [北 京]: common 2, P = 2/2, R = 2/4 -> F1 = 2/3
    assert f1_score(["北京大学"], "北京") == pytest.approx(2 / 3)
    # [甲 乙 丙 丁] vs [甲 丙 丁]: the longest common *substring* is 丙丁 (2), not the subsequence 甲丙丁 (3)
    # P = 2/3, R = 2/4 -> F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert f1_score(["甲乙丙丁"], "甲丙丁") == pytest.approx(4 / 7)
    assert exact_match(["北京大学"], "北京") == 0.0


def test_scorer_ignores_listed_punctuation_and_outer_whitespace():
    assert exact_match(["《红楼梦》"], " 红楼梦 ") == 1.0 and f1_score(["《红楼梦》"], " 红楼梦 ") == 1.0
    # "%" is not in the list: it stays a word of its own, so [50 %] vs [50]: P = 1, R = 1/2 -> F1 = 2/3
    assert mixed_segmentation("50%", remove_punctuation=True) == ["50", "%"]
    assert f1_score(["50%"], "50") == pytest.approx(2 / 3) and exact_match(["50%"], "50") == 0.0


def test_scorer_keeps_english_words_and_numbers_whole():
    segments = mixed_segmentation("iPhone 6发布于2014年", remove_punctuation=True)
    assert segments == ["iphone", "6", "发", "布", "于", "2014", "年"]
    # [iphone 6] is a 2-word substring of the 7 segments: P = 1, R = 2/7 -> F1 = 4/9
    assert f1_score(["iPhone 6发布于2014年"], "IPHONE 6") == pytest.approx(4 / 9)
    assert mixed_segmentation("3,000 people, u.s.") == ["3,000", "people", ",", "u.s", "."]


def test_scorer_takes_the_best_reference():
    # vs 1998年: [在 1998 年] ⊃ [1998 年]: P = 2/3, R = 1 -> 0.8; vs 1998: P = 1/3, R = 1 -> 0.5
    assert f1_score(["1998年", "1998"], "在1998年") == pytest.approx(0.8)
    assert exact_match(["1998年", "1998"], "1998") == 1.0


def test_scorer_empty_and_missing_predictions_score_zero():
    assert f1_score(["北京"], "") == 0.0 and exact_match(["北京"], "") == 0.0
    references = {"q1": ["北京大学"], "q2": ["北京大学"], "q3": ["50%"], "q4": ["上海"]}
    predictions = {"q1": "北京大学", "q2": "北京", "q3": "50"}  # q4 unanswered
    result = evaluate(references, predictions)
    f1 = 100 * (1 + 2 / 3 + 2 / 3 + 0) / 4
    em = 100 * (1 + 0 + 0 + 0) / 4
    assert result["f1"] == pytest.approx(f1) and result["em"] == pytest.approx(em)
    assert result["average"] == pytest.approx((f1 + em) / 2)
    assert result["total"] == 4 and result["skip"] == 1


# ---------------------------------------------------------------------------------------------------- windows

CONTEXT = "".join(chr(0x4E00 + 3 * i) for i in range(60))  # 60 distinct characters, one token each
ANSWER_START = 22


def squad(questions, context=CONTEXT):
    return {
        "version": "v1.0",
        "data": [{"id": "a", "paragraphs": [{"id": "p", "context": context, "qas": questions}]}],
    }


def write_json(path, document):
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def mrc_fixture(tmp_path, zh_tokenizer):
    answer = CONTEXT[ANSWER_START : ANSWER_START + 3]
    questions = [
        {"id": "Q1", "question": "问什么", "answers": [{"text": answer, "answer_start": ANSWER_START}]},
        # off-by-one start (as in the trial file) is moved to the text; a start of -1 with an absent text is kept
        {
            "id": "Q2",
            "question": "问",
            "answers": [{"text": CONTEXT[5:8], "answer_start": 4}, {"text": "无", "answer_start": -1}],
        },
    ]
    task = MRCTask(stride=4, max_answer_tokens=5)
    examples = task.read(write_json(tmp_path / "mrc.json", squad(questions)))
    # [CLS] 问什么 [SEP] context [SEP]: 20 - 6 = 14 context tokens per window, the next window starts 10 later
    features = task.encode(examples, zh_tokenizer, max_length=20)
    return task, examples, features, answer


def context_chars(feature):
    return [tuple(span) for span in feature["char_spans"] if span is not None]


def test_windows_overlap_by_the_stride_and_label_the_answer(mrc_fixture):
    task, examples, features, answer = mrc_fixture
    assert examples[1].label == [{"text": CONTEXT[5:8], "start": 5}, {"text": "无", "start": None}]
    windows = [f for f in features if f["example_index"] == 0]
    starts = [context_chars(w)[0][0] for w in windows]
    assert starts == [0, 10, 20, 30, 40, 50]
    for before, after in zip(windows, windows[1:], strict=False):
        assert context_chars(before)[-4:] == context_chars(after)[:4]  # exactly `stride` tokens shared
    assert context_chars(windows[-1])[-1] == (59, 60)
    for window in windows:
        assert window["span_mask"][:5] == [1, 0, 0, 0, 0]  # [CLS] yes, question and [SEP] no
        chars = context_chars(window)
        if chars[0][0] <= ANSWER_START and chars[-1][1] >= ANSWER_START + 3:
            i, j = window["label"]
            assert (i, j) == (5 + ANSWER_START - chars[0][0], 5 + ANSWER_START - chars[0][0] + 2)
            assert CONTEXT[window["char_spans"][i][0] : window["char_spans"][j][1]] == answer
        else:
            assert window["label"] == [0, 0]  # 10..24 holds only part of the answer
    assert [w["label"] != [0, 0] for w in windows] == [False, False, True, False, False, False]


def test_decode_hand_made_scores_recovers_the_answer(mrc_fixture):
    task, examples, features, answer = mrc_fixture
    batch = task.collate(features)
    length = batch.inputs["input_ids"].shape[1]
    logits = torch.zeros(len(features), 1, length, length)
    target = next(n for n, f in enumerate(features) if f["example_index"] == 0 and f["label"] != [0, 0])
    i, j = features[target]["label"]
    logits[target, 0, i, j] = 5.0
    logits[target, 0, 0, 0] = logits[target, 0, 0, 7] = 9.0  # [CLS] spans are never answers
    logits[target, 0, 1, 2] = 9.0  # question tokens
    logits[target, 0, 6, 12] = 9.0  # 7 tokens > max_answer_tokens = 5
    logits[target, 0, 9, 6] = 9.0  # end before start
    logits[target - 1, 0, 6, 7] = 4.0  # another window, lower score
    predictions = task.decode(logits, batch)
    assert predictions[target] == (i, j, 5.0) and predictions[target - 1] == (6, 7, 4.0)
    records = task.submission(examples, features, predictions)
    assert records[0] == {"id": "Q1", "answer": answer}
    result = task.score(examples, features, predictions)
    assert result["em"] == pytest.approx(50.0) and result["total"] == 2  # Q1 right, Q2 gets an all-zero window
    assert task.metric == "em" and {"em", "f1", "average"} <= result.keys()


def test_loss_is_softmax_over_allowed_spans(mrc_fixture):
    task, examples, features, _ = mrc_fixture
    feature = features[2]  # the window holding Q1's answer
    batch = task.collate([feature])
    torch.manual_seed(0)
    length = len(feature["input_ids"])
    logits = torch.randn(1, 1, length, length)
    mask = feature["span_mask"]
    allowed = [(0, 0)] + [(a, b) for a in range(1, length) for b in range(a, length) if mask[a] and mask[b]]
    i, j = feature["label"]
    expected = math.log(sum(math.exp(logits[0, 0, a, b].item()) for a, b in allowed)) - logits[0, 0, i, j].item()
    assert task.loss(logits, batch).item() == pytest.approx(expected, rel=1e-5)


def test_sentencepiece_windows_map_answers_to_whole_pieces(tmp_path, sp_tokenizer):
    context = "我爱北京欢迎你北京"  # "▁我" 爱 北京 欢迎 你 北京: pieces cover several characters
    questions = [
        {"id": "exact", "question": "爱", "answers": [{"text": "北京欢迎", "answer_start": 2}]},
        {"id": "inside", "question": "爱", "answers": [{"text": "京欢", "answer_start": 3}]},
    ]
    task = MRCTask(stride=1)
    examples = task.read(write_json(tmp_path / "sp.json", squad(questions, context)))
    features = task.encode(examples, sp_tokenizer, max_length=9)  # <s> ▁ 爱 </s> </s> + 3 context tokens + </s>
    windows = [[tuple(span) for span in f["char_spans"] if span] for f in features if f["example_index"] == 0]
    assert windows == [[(0, 1), (1, 2), (2, 4)], [(2, 4), (4, 6), (6, 7)], [(6, 7), (7, 9)]]
    oracle = [(f["label"][0], f["label"][1], 1.0) if f["label"] != [0, 0] else None for f in features]
    # an answer boundary inside a piece widens to the whole piece
    assert task.submission(examples, features, oracle) == [
        {"id": "exact", "answer": "北京欢迎"},
        {"id": "inside", "answer": "北京欢迎"},
    ]


@pytest.mark.parametrize(
    "question, message",
    [
        ({"id": "Q1", "answers": []}, 'missing "question"'),
        ({"id": "Q1", "question": "问", "answers": [{"text": "不在", "answer_start": 3}]}, "is not in the context"),
        ({"question": "问", "answers": []}, 'missing question "id"'),
    ],
)
def test_read_rejects_bad_questions(tmp_path, question, message):
    path = write_json(tmp_path / "bad.json", squad([question]))
    with pytest.raises(DataError, match=message) as error:
        MRCTask().read(path)
    assert str(error.value).startswith(str(path))


def test_read_reports_bad_json_line_and_duplicate_ids(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:2: bad JSON"):
        MRCTask().read(path)
    question = {"id": "Q1", "question": "问", "answers": [{"text": CONTEXT[:2], "answer_start": 0}]}
    path = write_json(tmp_path / "dup.json", squad([question, question]))
    with pytest.raises(DataError, match="duplicate question id 'Q1'") as error:
        MRCTask().read(path)
    assert str(error.value).startswith(f"{path}:")


def test_window_too_small_for_the_stride_is_an_error(mrc_fixture, zh_tokenizer):
    task, examples, _, _ = mrc_fixture
    with pytest.raises(ValueError, match="stride=128"):
        MRCTask().encode(examples, zh_tokenizer, max_length=100)


def test_end_to_end_tiny_bert(mrc_fixture, zh_tokenizer):
    from transformers import BertModel

    task, examples, features, _ = mrc_fixture
    torch.manual_seed(0)
    model = TaskModel.for_task(task, BertModel(tiny_bert_config(vocab_size=len(zh_tokenizer))))
    assert model.head.heads == 1 and model.head.dense.bias is None
    batch = task.collate(features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = task.loss(model(**batch.inputs), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4
    with torch.no_grad():
        predictions = task.decode(model.eval()(**batch.inputs), batch)
    result = task.score(examples, features, predictions)
    assert 0.0 <= result["em"] <= result["f1"] <= 100.0
    assert len(task.submission(examples, features, predictions)) == len(examples)


def test_real_cmrc_files(data_dir, zh_tokenizer):
    folder = data_dir / "cmrc2018"
    if not folder.is_dir():
        pytest.skip("cmrc2018 not in the data folder")
    task = MRCTask()
    trial, dev = task.read(folder / "cmrc2018_trial.json"), task.read(folder / "cmrc2018_dev.json")
    assert (len(trial), len(dev)) == (1002, 3219)
    assert all(len(e.label) == 3 for e in dev) and all(len(e.label) == 1 for e in trial)
    assert all(any(a["start"] is not None for a in e.label) for e in trial + dev)
    assert sum(a["start"] is None for e in dev for a in e.label) == 193
    # Oracle decoding of the trial labels through the windows and offsets recovers the answers. With 128 tokens of
    # overlap one 183-character answer straddles two windows; the paper's windows (a new one every 128) hold them all.
    for task, missing in ((MRCTask(), ["TRIAL_570_QUERY_1"]), (MRCTask(window_step=128), [])):
        features = task.encode(trial, zh_tokenizer, max_length=512)
        labelled = {f["example_index"] for f in features if f["label"] != [0, 0]}
        assert [e.uid for k, e in enumerate(trial) if k not in labelled] == missing
        oracle = [(f["label"][0], f["label"][1], 1.0) if f["label"] != [0, 0] else None for f in features]
        result = task.score(trial, features, oracle)
        # the two misses: an answer starting inside the English word "JAXR" (one [UNK] token) and a Hebrew answer
        assert result["skip"] == len(missing) and result["em"] == pytest.approx(100 * (1000 - len(missing)) / 1002)
