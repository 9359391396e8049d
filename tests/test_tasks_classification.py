"""Classification tasks, the task model and the registry: encodings, markers, errors, metrics pinned by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import char_vocab, tiny_bert_config

from fltuning.tasks.base import DataError, Example
from fltuning.tasks.classification import (
    ClassificationTask,
    CSLTask,
    WSCTask,
    mark_wsc_spans,
    truncate_longest,
)
from fltuning.tasks.model import TaskModel, default_pooling, pool
from fltuning.tasks.registry import get_task, task_files


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def tokens(tok, ids: list[int]) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


# -- encoding ------------------------------------------------------------------------------------------------------


def test_pair_truncation_pops_from_the_longer_side_first_side_on_ties(tok, tmp_path):
    path = write_lines(tmp_path / "p.json", [{"sentence1": "一二三四五六", "sentence2": "七八九", "label": "1"}])
    task = ClassificationTask(text_field="sentence1", text_pair_field="sentence2", labels=["0", "1"])
    (feature,) = task.encode(task.read(path), tok, max_length=8)
    # budget 8 - 3 = 5: (6,3) -> (5,3) -> (4,3) -> (3,3) tie: first side -> (2,3)
    assert tokens(tok, feature["input_ids"]) == ["[CLS]", "一", "二", "[SEP]", "七", "八", "九", "[SEP]"]
    assert feature["label"] == 1 and feature["example_index"] == 0
    assert "token_type_ids" not in task.collate([feature]).inputs  # BERT then uses all-zero segments, as the paper


def test_single_sentence_is_cut_at_its_end(tok, tmp_path):
    path = write_lines(tmp_path / "s.json", [{"sentence": "一二三四五六", "label": "102"}])
    task = get_task("fewclue/tnews")
    (feature,) = task.encode(task.read(path), tok, max_length=5)
    assert tokens(tok, feature["input_ids"]) == ["[CLS]", "一", "二", "三", "[SEP]"]
    assert feature["label"] == task.labels.index("102") == 2


def test_truncate_longest_counts_bias_and_breaks_ties_to_the_earliest():
    assert truncate_longest([[1, 2, 3], [4, 5, 6]], 4) == [[1, 2], [4, 5]]
    assert truncate_longest([[1, 2], [3, 4, 5]], 4, bias=[2, 0]) == [[1], [3, 4, 5]]


def test_csl_joins_keywords_with_fullwidth_semicolon(tok, tmp_path):
    path = write_lines(tmp_path / "c.json", [{"id": 7, "abst": "摘要", "keyword": ["甲", "乙丙"], "label": "0"}])
    task = CSLTask()
    (example,) = task.read(path)
    assert (example.fields["text"], example.fields["text_pair"], example.uid) == ("甲；乙丙", "摘要", 7)
    (feature,) = task.encode([example], tok, 128)
    assert tokens(tok, feature["input_ids"]) == ["[CLS]", "甲", "；", "乙", "丙", "[SEP]", "摘", "要", "[SEP]"]


@pytest.mark.parametrize(
    ("text", "span1", "span2", "expected"),
    [
        ("小明说他饿了", (0, "小明"), (3, "他"), "_小明_说[他]饿了"),  # span1 first
        ("他说小明饿了", (2, "小明"), (0, "他"), "[他]说_小明_饿了"),  # span2 first
    ],
)
def test_wsc_markers_both_orders(text, span1, span2, expected, tmp_path):
    assert mark_wsc_spans(text, span1[0], span1[1], span2[0], span2[1]) == expected
    target = {"span1_index": span1[0], "span1_text": span1[1], "span2_index": span2[0], "span2_text": span2[1]}
    path = write_lines(tmp_path / "w.json", [{"target": target, "idx": 3, "label": "true", "text": text}])
    (example,) = WSCTask().read(path)
    assert (example.fields["text"], example.label, example.uid) == (expected, "true", 3)


def test_wsc_span_not_at_its_index_names_file_and_line(tmp_path):
    target = {"span1_index": 1, "span1_text": "小明", "span2_index": 3, "span2_text": "他"}
    good = {"target": {**target, "span1_index": 0}, "label": "false", "text": "小明说他饿了"}
    path = write_lines(tmp_path / "w.json", [good, {"target": target, "label": "false", "text": "小明说他饿了"}])
    with pytest.raises(DataError, match=r"w\.json:2: span1_text '小明' is not at span1_index 1"):
        WSCTask().read(path)


# -- reading errors ------------------------------------------------------------------------------------------------

GOOD = {"sentence1": "你好", "sentence2": "您好", "label": "1"}


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"sentence1": "你好", "sentence2": ', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"sentence1": "你好", "label": "1"}, "missing field 'sentence2'"),
        ({"sentence1": "你好", "sentence2": "好", "label": "2"}, "unknown label '2'"),
        ({"sentence1": "  ", "sentence2": "好", "label": "1"}, "empty text in field 'sentence1'"),
        ({"sentence1": 5, "sentence2": "好", "label": "1"}, "must be a string"),
    ],
)
def test_bad_lines_raise_data_error_with_file_and_line(bad_line, message, tmp_path):
    path = write_lines(tmp_path / "bad.json", [GOOD, "", bad_line])  # line 2 is blank: the bad one is line 3
    with pytest.raises(DataError, match=f"bad\\.json:3: .*{message}") as info:
        get_task("fewclue/bustm").read(path)
    assert info.value.line == 3 and info.value.path == str(path)


def test_csl_keyword_errors(tmp_path):
    path = write_lines(tmp_path / "c.json", [{"abst": "摘要", "keyword": [], "label": "0"}])
    with pytest.raises(DataError, match=r"c\.json:1: field 'keyword' must be a non-empty list"):
        CSLTask().read(path)


def test_nli_drops_dash_labels_and_integer_labels_become_strings(tmp_path):
    rows = [{"sentence1": "甲", "sentence2": "乙", "label": lab} for lab in ["neutral", "-", "entailment"]]
    examples = get_task("ocnli").read(write_lines(tmp_path / "o.json", rows))
    assert [e.label for e in examples] == ["neutral", "entailment"]
    assert [e.uid for e in examples] == [0, 2]  # no id field: the position in the file
    iflytek = get_task("fewclue/iflytek").read(write_lines(tmp_path / "i.json", [{"sentence": "甲", "label": 8}]))
    assert iflytek[0].label == "8"


def test_labels_collected_from_the_first_file_then_enforced(tmp_path):
    task = get_task("fewclue/csldcp")
    rows = [{"content": "甲", "label": lab, "id": i} for i, lab in enumerate(["物理学", "化学", "物理学"])]
    task.read(write_lines(tmp_path / "train.json", rows))
    assert task.labels == ["化学", "物理学"]
    with pytest.raises(DataError, match=r"dev\.json:1: unknown label '数学'"):
        task.read(write_lines(tmp_path / "dev.json", [{"content": "乙", "label": "数学"}]))


def test_encode_without_labels_known_asks_for_the_training_file():
    task = ClassificationTask(labels=None)
    with pytest.raises(ValueError, match="read the training file first"):
        task.encode([Example(uid=0, fields={"text": "甲", "text_pair": None}, label="x")], None, 8)


# -- metric and submission -----------------------------------------------------------------------------------------


def test_accuracy_and_submission_in_test_order(tmp_path):
    rows = [
        {"id": i, "sentence": "甲", "label": lab}
        for i, lab in zip([30, 10, 20, 40], ["Positive"] * 2 + ["Negative"] * 2, strict=True)
    ]
    task = get_task("fewclue/eprstmt")  # labels: Negative = 0, Positive = 1
    examples = task.read(write_lines(tmp_path / "t.json", rows))
    features = [{"input_ids": [2, 3], "example_index": i} for i in range(4)]
    predictions = [1, 0, 0, 0]  # right, wrong, right, right
    assert task.score(examples, features, predictions) == {"accuracy": 0.75}
    # features may come back in any order: predictions follow their features
    assert task.score(examples, features[::-1], predictions[::-1]) == {"accuracy": 0.75}
    assert task.submission(examples, features, predictions) == [
        {"id": 30, "label": "Positive"},
        {"id": 10, "label": "Negative"},
        {"id": 20, "label": "Negative"},
        {"id": 40, "label": "Negative"},
    ]


# -- task model ----------------------------------------------------------------------------------------------------


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float).reshape(2, 3, 1)  # values 0..5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "cls").flatten().tolist() == [0.0, 3.0]
    assert pool(hidden, mask, "last").flatten().tolist() == [1.0, 5.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [0.5, 4.0]
    assert pool(hidden, torch.tensor([[0, 1, 1], [1, 1, 1]]), "last").flatten().tolist() == [2.0, 5.0]  # left padded
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, mask, "max")


def test_default_pooling_by_architecture():
    from transformers import LlamaConfig

    assert default_pooling(tiny_bert_config()) == "cls"
    assert default_pooling(LlamaConfig()) == "last"


def test_prepended_virtual_tokens_are_dropped_before_pooling():
    class PromptedBackbone(torch.nn.Module):  # returns 2 prompt positions in front of the T real ones
        def forward(self, input_ids, attention_mask):
            real = input_ids.float().unsqueeze(-1)
            return type("Out", (), {"last_hidden_state": torch.cat([torch.full_like(real[:, :2], -1.0), real], 1)})

    head = get_task("fewclue/bustm").build_head(tiny_bert_config(hidden_size=1, num_attention_heads=1))
    model = TaskModel(PromptedBackbone(), head)
    with torch.no_grad():
        head.dense.weight.fill_(1.0)
    logits = model(input_ids=torch.tensor([[7, 8, 9]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert logits.tolist() == [[7.0, 7.0]]  # the [CLS] (first real) position


@pytest.fixture(scope="module")
def tiny_model_factory():
    from transformers import BertModel

    def build(task):
        torch.manual_seed(0)
        backbone = BertModel(tiny_bert_config(vocab_size=len(char_vocab())), add_pooling_layer=False)
        return TaskModel.for_task(task, backbone)

    return build


@pytest.mark.parametrize("task_name", ["fewclue/tnews", "fewclue/bustm", "fewclue/cluewsc", "fewclue/csl"])
def test_end_to_end_forward_loss_backward_decode_score(task_name, tok, tiny_model_factory, tmp_path):
    records = {
        "fewclue/tnews": [
            {"sentence": "今天天气很好" * (i + 1), "label": lab} for i, lab in enumerate([100, 116, 100])
        ],
        "fewclue/bustm": [{"sentence1": "你好" * (i + 1), "sentence2": "您好", "label": str(i % 2)} for i in range(3)],
        "fewclue/cluewsc": [
            {
                "target": {"span1_index": 0, "span1_text": "小明", "span2_index": 3, "span2_text": "他"},
                "text": t,
                "label": lab,
            }
            for t, lab in [("小明说他饿了", "true"), ("小明说他饿了吗", "false"), ("小明说他不饿", "true")]
        ],
        "fewclue/csl": [
            {"abst": "摘要内容" * (i + 1), "keyword": ["甲", "乙"], "label": str(i % 2)} for i in range(3)
        ],
    }[task_name]
    task = get_task(task_name)
    examples = task.read(write_lines(tmp_path / "d.json", records))
    features = task.encode(examples, tok, max_length=32)
    batch = task.collate(features)
    model = tiny_model_factory(task)
    logits = model(**batch.inputs)
    assert logits.shape == (3, len(task.labels))
    loss = task.loss(logits, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.head.dense.weight.grad.abs().sum() > 0
    assert model.backbone.embeddings.word_embeddings.weight.grad is not None
    predictions = task.decode(logits.detach(), batch)
    gold = [task.labels.index(e.label) for e in examples]
    expected = sum(p == g for p, g in zip(predictions, gold, strict=True)) / 3
    assert task.score(examples, features, predictions) == {"accuracy": expected}
    # padding does not change an example's logits: batched == alone
    alone = model(**task.collate(features[:1]).inputs)
    torch.testing.assert_close(alone[0], logits[0], rtol=1e-5, atol=1e-5)


def test_head_is_truncated_normal_with_zero_bias():
    task = ClassificationTask(labels=[str(i) for i in range(50)])
    torch.manual_seed(0)
    head = task.build_head(tiny_bert_config(hidden_size=256, num_attention_heads=4))
    weight = head.dense.weight
    assert weight.abs().max() <= 0.04 and 0.015 < weight.std() < 0.02 and not head.dense.bias.any()


# -- registry ------------------------------------------------------------------------------------------------------


def test_fewclue_layout(tmp_path):
    folder = tmp_path / "fewclue" / "tnews"
    folder.mkdir(parents=True)
    for name in ["train_0.json", "dev_0.json", "train_few_all.json", "dev_few_all.json", "test_public.json"]:
        (folder / name).write_text("")
    assert task_files("fewclue/tnews", tmp_path, split=0) == {
        "train": folder / "train_0.json",
        "dev": folder / "dev_0.json",
        "test": folder / "test_public.json",
    }
    assert task_files("fewclue/tnews", tmp_path, split="all")["train"] == folder / "train_few_all.json"
    with pytest.raises(DataError, match=r"fewclue/tnews/train_3\.json: file not found; expected .*train_\{split\}"):
        task_files("fewclue/tnews", tmp_path, split=3)
    with pytest.raises(ValueError, match="needs split="):
        task_files("fewclue/tnews", tmp_path)


def test_data_dir_from_environment_and_optional_test(tmp_path, monkeypatch):
    folder = tmp_path / "afqmc_public"
    folder.mkdir()
    for name in ["train.json", "dev.json"]:
        (folder / name).write_text("")
    monkeypatch.setenv("FLTUNING_DATA_DIR", str(tmp_path))
    assert task_files("afqmc") == {"train": folder / "train.json", "dev": folder / "dev.json"}
    monkeypatch.delenv("FLTUNING_DATA_DIR")
    with pytest.raises(DataError, match="FLTUNING_DATA_DIR"):
        task_files("afqmc")
    with pytest.raises(DataError, match=r"folder not found; expected <data_dir>/tnews or tnews_public/"):
        task_files("tnews", tmp_path)


def test_unknown_task_and_lazy_ner_mrc_tasks():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    assert get_task("cluener2020").kind == get_task("cluener").kind  # alias
    assert get_task("cmrc2018") is not None
    custom = get_task("custom", text_field="review", label_field="stars")
    assert (custom.text_field, custom.label_field) == ("review", "stars")


# -- real data -----------------------------------------------------------------------------------------------------

FEWCLUE_CLASSIFICATION = ["bustm", "cluewsc", "csl", "csldcp", "eprstmt", "iflytek", "ocnli", "tnews"]


def count_lines(path: Path, skip_label: str | None = None) -> int:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return sum(1 for line in lines if skip_label is None or json.loads(line).get("label") != skip_label)


@pytest.mark.parametrize("name", FEWCLUE_CLASSIFICATION)
def test_real_fewclue_files_parse_with_all_lines(name, data_dir):
    folder = data_dir / "fewclue" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    task = get_task(f"fewclue/{name}")
    splits = [task_files(f"fewclue/{name}", data_dir, split=s) for s in [*range(5), "all"]]
    files = sorted({path for parts in splits for path in parts.values()})
    assert len(files) == 13  # train / dev for 0..4 and all, plus test_public
    for path in files:
        examples = task.read(path)
        assert len(examples) == count_lines(path, "-"), path
        assert all(e.label is not None for e in examples)
    num_labels = {"csldcp": 67, "iflytek": 119, "ocnli": 3, "tnews": 15}
    assert len(task.labels) == num_labels.get(name, 2)
    # submission: one record per test line, in file order, with the file's ids
    test = task.read(splits[0]["test"])
    records = task.submission(test, [{"example_index": i} for i in range(len(test))], [0] * len(test))
    lines = [json.loads(line) for line in splits[0]["test"].read_text(encoding="utf-8").split("\n") if line.strip()]
    assert [r["id"] for r in records] == [line.get("id", line.get("idx")) for line in lines]
    assert all(set(r) == {"id", "label"} and r["label"] == task.labels[0] for r in records)


def test_real_full_data_pairs_parse(data_dir):
    if not (data_dir / "ocnli").is_dir() or not (data_dir / "afqmc_dataclue").is_dir():
        pytest.skip("ocnli / afqmc_dataclue not found")
    ocnli = task_files("ocnli", data_dir, split="3k")
    assert set(ocnli) == {"train", "dev"}  # the unlabelled test.json is not in the shared data
    task = get_task("ocnli")
    assert len(task.read(ocnli["train"])) == count_lines(ocnli["train"], "-") == 2994
    assert len(task.read(ocnli["dev"])) == 2950
    afqmc = task_files("afqmc_dataclue", data_dir)
    task = get_task("afqmc_dataclue")
    assert [len(task.read(afqmc[p])) for p in ("train", "dev", "test")] == [10000, 2000, 2000]
