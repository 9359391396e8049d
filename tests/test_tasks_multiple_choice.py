"""C3 and CHID: encodings, truncation and the one-to-one blank assignment pinned by hand, end to end on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import char_vocab, tiny_bert_config

from fltuning.tasks.base import DataError
from fltuning.tasks.model import TaskModel
from fltuning.tasks.multiple_choice import C3Task, CHIDTask, assign_blanks, trim_context
from fltuning.tasks.registry import get_task, task_files


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


def c3_file(path: Path, documents: list) -> Path:
    path.write_text(json.dumps(documents, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# -- C3 --------------------------------------------------------------------------------------------------------------


def test_c3_encoding_truncates_the_longest_part_and_pads_choices(tok, tmp_path):
    doc = [["一二三四", "五六七"], [{"question": "问题", "choice": ["甲", "乙"], "answer": "乙"}], "m1-1"]
    task = C3Task()
    (example,) = task.read(c3_file(tmp_path / "m.json", [doc]))
    assert example.fields["passage"] == "一二三四||五六七"
    assert example.fields["choices"] == ["甲", "乙", "无效答案", "无效答案"] and example.label == 1
    (feature,) = task.encode([example], tok, max_length=12)
    # budget 12 - 4 = 8 tokens for choice (1), question (2), passage (9: "一二三四||五六七" with | as 2 tokens);
    # compared as choice+1, question+1, passage+2: the passage loses its last tokens until 1 + 2 + 5 = 8.
    assert tokens(tok, feature["input_ids"][0]) == [
        "[CLS]", "一", "二", "三", "四", "|", "[SEP]", "问", "题", "[SEP]", "甲", "[SEP]"
    ]  # fmt: skip
    # the padded choice (4 tokens, counted 5) ties with the cut passage (3, counted 5): the choice is cut first
    assert tokens(tok, feature["input_ids"][2]) == [
        "[CLS]", "一", "二", "三", "[SEP]", "问", "题", "[SEP]", "无", "效", "答", "[SEP]"
    ]  # fmt: skip
    assert feature["label"] == 1 and len(feature["input_ids"]) == 4


def test_c3_ties_are_cut_from_the_choice_first(tok, tmp_path):
    doc = [["一二三"], [{"question": "子丑寅卯", "choice": ["甲乙丙丁"], "answer": "甲乙丙丁"}]]
    task = C3Task(num_choices=1)
    (feature,) = task.encode(task.read(c3_file(tmp_path / "d.json", [doc])), tok, max_length=14)
    # budget 10; counted lengths choice 4+1, question 4+1, passage 3+2 all tie: the choice loses a token
    assert tokens(tok, feature["input_ids"][0]) == [
        "[CLS]", "一", "二", "三", "[SEP]", "子", "丑", "寅", "卯", "[SEP]", "甲", "乙", "丙", "[SEP]"
    ]  # fmt: skip


def test_c3_reads_m_and_d_files_together(tmp_path):
    m = c3_file(
        tmp_path / "m.json", [[["甲"], [{"question": "问", "choice": ["对", "错"], "answer": "对"}] * 2, "m1"]]
    )
    d = c3_file(tmp_path / "d.json", [[["乙"], [{"question": "问", "choice": ["对", "错"], "answer": "错"}], "d1"]])
    examples = C3Task().read((m, d))
    assert [(e.uid, e.label) for e in examples] == [(0, 0), (1, 0), (2, 1)]


@pytest.mark.parametrize(
    ("question", "message"),
    [
        ({"question": "问", "choice": ["对", "错"], "answer": "不对"}, "document 0 .id x., question 1: answer '不对'"),
        ({"question": "", "choice": ["对"], "answer": "对"}, "question 1: missing or empty field 'question'"),
        ({"question": "问", "choice": ["1", "2", "3", "4", "5"], "answer": "1"}, "question 1: 5 choices"),
        ({"question": "问", "choice": ["对", " "], "answer": "对"}, "question 1: empty or non-string choice"),
    ],
)
def test_c3_bad_questions_raise_data_error(question, message, tmp_path):
    good = {"question": "问", "choice": ["对", "错"], "answer": "对"}
    path = c3_file(tmp_path / "c3.json", [[["甲"], [good, question], "x"]])
    with pytest.raises(DataError, match=message):
        C3Task().read(path)


def test_c3_bad_json_names_the_line(tmp_path):
    path = tmp_path / "c3.json"
    path.write_text('[\n [["甲"],\n  [{"question": }]]\n]')
    with pytest.raises(DataError, match=r"c3\.json:3: not valid JSON"):
        C3Task().read(path)


# -- CHID ------------------------------------------------------------------------------------------------------------


def test_chid_encoding_trims_the_longer_context_at_its_outer_end(tok, tmp_path):
    path = jsonl(
        tmp_path / "c.json",
        [{"id": 5, "candidates": ["一二三四", "五六七八"], "content": "甲乙丙丁#idiom#戊己", "answer": 1}],
    )
    task = CHIDTask()
    (example,) = task.read(path)
    (feature,) = task.encode([example], tok, max_length=12)
    # 12 - [CLS] idiom [SEP] [unused1] [SEP] = 4 context tokens: left 4 > right 2 loses 甲, then 3 > 2 loses 乙
    assert tokens(tok, feature["input_ids"][1]) == [
        "[CLS]", "五", "六", "七", "八", "[SEP]", "丙", "丁", "[unused1]", "戊", "己", "[SEP]"
    ]  # fmt: skip
    assert feature["label"] == 1 and example.uid == 5


def test_chid_clue_format_other_blanks_become_masks(tok, tmp_path):
    line = {
        "candidates": ["一二三四", "五六七八", "九十百千"],
        "content": ["甲#idiom000001#乙#idiom000002#丙", "丁#idiom000003#"],
    }
    path = jsonl(tmp_path / "dev.json", [line])
    (tmp_path / "dev_answer.json").write_text('{"#idiom000001#": 2, "#idiom000002#": 0, "#idiom000003#": 1}')
    task = CHIDTask()
    examples = task.read(path)
    assert [(e.uid, e.label) for e in examples] == [("#idiom000001#", 2), ("#idiom000002#", 0), ("#idiom000003#", 1)]
    assert len({e.fields["group"] for e in examples}) == 1  # one line: one assignment group
    features = task.encode(examples, tok, max_length=64)
    assert tokens(tok, features[1]["input_ids"][0])[6:] == ["甲"] + ["[MASK]"] * 4 + ["乙", "[unused1]", "丙", "[SEP]"]
    assert tokens(tok, features[2]["input_ids"][0])[6:] == ["丁", "[unused1]", "[SEP]"]
    unlabelled = CHIDTask().read(jsonl(tmp_path / "test.json", [line]))  # no test_answer.json
    assert [e.label for e in unlabelled] == [None, None, None]


def test_trim_context_drops_a_segment_with_its_masks():
    left, right = trim_context([[1], [2, 3]], [[4]], budget=2, mask_length=4)
    assert (left, right) == ([[3]], [[4]])  # [1] goes with its 4 masks, then the longer left loses 2


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"candidates": ["一二三四"], "content": "没有空", "answer": 0},
            "expected exactly one #idiom# blank, found 0",
        ),
        ({"candidates": ["一二三四"], "content": "有#idiom#空", "answer": 3}, "answer 3 is not a candidate index"),
        ({"candidates": [], "content": "有#idiom#空", "answer": 0}, "missing or empty field 'candidates'"),
        ({"candidates": ["一二三四"], "answer": 0}, "field 'content' must be"),
    ],
)
def test_chid_bad_lines_raise_data_error_with_file_and_line(record, message, tmp_path):
    good = {"candidates": ["一二三四"], "content": "有#idiom#空", "answer": 0}
    with pytest.raises(DataError, match=f"c\\.json:2: {message}"):
        CHIDTask().read(jsonl(tmp_path / "c.json", [good, record]))


def test_assignment_resolves_argmax_collisions():
    scores = np.array([[0.9, 0.8, 0.1], [0.85, 0.2, 0.1], [0.3, 0.35, 0.4]])
    assert scores.argmax(axis=1).tolist() == [0, 0, 2]  # blanks 0 and 1 both want candidate 0
    assert assign_blanks(scores) == [1, 0, 2]  # 0.8 + 0.85 + 0.4 = 2.05 is the best one-to-one total
    assert assign_blanks(np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.7]])) == [0, 0, 1]  # 3 blanks, 2 candidates


def test_chid_score_assigns_per_line_and_argmax_across_lines(tmp_path):
    candidates = ["一二三四", "五六七八", "九十百千"]
    line = {"candidates": candidates, "content": ["甲#idiom000001#乙#idiom000002#丙#idiom000003#丁"]}
    path = jsonl(tmp_path / "dev.json", [line])
    (tmp_path / "dev_answer.json").write_text('{"#idiom000001#": 1, "#idiom000002#": 0, "#idiom000003#": 2}')
    task = CHIDTask()
    examples = task.read(path)
    features = [{"example_index": i} for i in range(3)]
    scores = [[0.9, 0.8, 0.1], [0.85, 0.2, 0.1], [0.3, 0.35, 0.4]]
    assert task.score(examples, features, scores) == {"accuracy": 1.0}
    assert task.submission(examples, features, scores) == [
        {"id": "#idiom000001#", "answer": 1},
        {"id": "#idiom000002#", "answer": 0},
        {"id": "#idiom000003#", "answer": 2},
    ]
    # FewCLUE: one blank per line, so each blank keeps its own argmax
    few = [{"id": i, "candidates": candidates, "content": "甲#idiom#乙", "answer": a} for i, a in enumerate([1, 0, 2])]
    few_examples = task.read(jsonl(tmp_path / "few.json", few))
    assert task.score(few_examples, features, scores) == {"accuracy": 2 / 3}


# -- end to end ------------------------------------------------------------------------------------------------------


def tiny_model(task) -> TaskModel:
    from transformers import BertModel

    torch.manual_seed(0)
    return TaskModel.for_task(task, BertModel(tiny_bert_config(vocab_size=len(char_vocab())), add_pooling_layer=False))


def test_c3_end_to_end(tok, tmp_path):
    qa = [
        {"question": "谁来了", "choice": ["他", "她", "它"], "answer": "她", "id": 11},
        {"question": "几点了", "choice": ["一点", "两点", "三点", "四点"], "answer": "四点", "id": 12},
    ]
    task = get_task("c3")
    examples = task.read(c3_file(tmp_path / "c3.json", [[["今天她来了。", "四点了。"], qa, "m1"]]))
    features = task.encode(examples, tok, max_length=64)
    batch = task.collate(features)
    assert batch.inputs["input_ids"].shape[:2] == (2, 4) and batch.targets["choice_mask"].all()
    model = tiny_model(task)
    logits = model(**batch.inputs)
    assert logits.shape == (2, 4)
    task.loss(logits, batch).backward()
    assert model.head.dense.weight.grad.abs().sum() > 0
    predictions = task.decode(logits.detach(), batch)
    expected = sum(p == e.label for p, e in zip(predictions, examples, strict=True)) / 2
    assert task.score(examples, features, predictions) == {"accuracy": expected}
    records = task.submission(examples, features, predictions)
    assert [r["id"] for r in records] == [11, 12] and all(set(r) == {"id", "label"} for r in records)
    # each question scored alone equals the batched scores (padding of choices and tokens changes nothing)
    alone = model(**task.collate(features[:1]).inputs)
    torch.testing.assert_close(alone[0], logits[0], rtol=1e-5, atol=1e-5)


def test_chid_end_to_end_with_uneven_candidate_counts(tok, tmp_path):
    records = [
        {"id": 0, "candidates": ["一二三四", "五六七八", "九十百千"], "content": "甲乙#idiom#丙丁", "answer": 2},
        {"id": 1, "candidates": ["一二三四", "五六七八"], "content": "#idiom#丙丁", "answer": 0},
    ]
    task = get_task("fewclue/chid")
    examples = task.read(jsonl(tmp_path / "chid.json", records))
    features = task.encode(examples, tok, max_length=64)
    batch = task.collate(features)
    assert batch.targets["choice_mask"].tolist() == [[True, True, True], [True, True, False]]
    model = tiny_model(task)
    logits = model(**batch.inputs)
    loss = task.loss(logits, batch)
    loss.backward()
    assert torch.isfinite(loss)
    predictions = task.decode(logits.detach(), batch)
    assert [len(p) for p in predictions] == [3, 2]  # the padded slot is not a candidate
    chosen = [int(np.argmax(p)) for p in predictions]
    expected = sum(c == e.label for c, e in zip(chosen, examples, strict=True)) / 2
    assert task.score(examples, features, predictions) == {"accuracy": expected}
    assert task.submission(examples, features, predictions) == [
        {"id": 0, "answer": chosen[0]},
        {"id": 1, "answer": chosen[1]},
    ]


# -- real data -------------------------------------------------------------------------------------------------------


def test_real_c3_parses_with_all_questions(data_dir):
    if not (data_dir / "c3").is_dir():
        pytest.skip("c3 not found")
    files = task_files("c3", data_dir)
    task = get_task("c3")
    for part in ("train", "dev", "test"):
        expected = sum(len(doc[1]) for f in files[part] for doc in json.loads(f.read_text(encoding="utf-8")))
        examples = task.read(files[part])
        assert len(examples) == expected and all(e.label is not None for e in examples)
    assert expected == 1890 + 2002  # test: d + m


@pytest.mark.parametrize("split", [*range(5), "all"])
def test_real_fewclue_chid_parses_with_all_lines(split, data_dir):
    if not (data_dir / "fewclue" / "chid").is_dir():
        pytest.skip("fewclue/chid not found")
    files = task_files("fewclue/chid", data_dir, split=split)
    task = get_task("fewclue/chid")
    for path in files.values() if split == 0 else (files["train"], files["dev"]):
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        examples = task.read(path)
        assert len(examples) == len(lines) and all(len(e.fields["candidates"]) == 7 for e in examples)
        assert len({e.fields["group"] for e in examples}) == len(examples)  # one blank per line
