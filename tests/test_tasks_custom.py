"""Bring-your-own-data classification: JSON Lines, CSV / TSV, datasets folders and load_dataset, all offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import char_vocab, tiny_bert_config

from fltuning.tasks.base import DataError
from fltuning.tasks.custom import CustomClassificationTask
from fltuning.tasks.model import TaskModel
from fltuning.tasks.registry import get_task


@pytest.fixture(scope="module")
def tok(char_tokenizer):
    return char_tokenizer


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_pair_with_named_fields(tok, tmp_path):
    rows = [{"q1": "你好", "q2": "您好", "same": 1, "qid": "a"}, {"q1": "早", "q2": "晚", "same": 0, "qid": "b"}]
    task = get_task("custom", text_field="q1", text_pair_field="q2", label_field="same", id_field="qid")
    examples = task.read(jsonl(tmp_path / "train.jsonl", rows))
    assert task.labels == ["0", "1"]  # collected from the training file, sorted
    assert [(e.uid, e.fields["text"], e.fields["text_pair"], e.label) for e in examples] == [
        ("a", "你好", "您好", "1"),
        ("b", "早", "晚", "0"),
    ]
    features = task.encode(examples, tok, max_length=16)
    assert tok.convert_ids_to_tokens(features[0]["input_ids"]) == ["[CLS]", "你", "好", "[SEP]", "您", "好", "[SEP]"]
    assert [f["label"] for f in features] == [1, 0]
    with pytest.raises(DataError, match=r"dev\.jsonl:1: unknown label '2'"):
        task.read(jsonl(tmp_path / "dev.jsonl", [{"q1": "a", "q2": "b", "same": 2}]))


def test_csv_and_tsv_with_header(tmp_path):
    (tmp_path / "d.csv").write_text('review,stars\n"好,很好",5\n差,1\n', encoding="utf-8")
    task = CustomClassificationTask(text_field="review", label_field="stars")
    examples = task.read(tmp_path / "d.csv")
    assert [(e.fields["text"], e.label, e.uid, e.source[-5:]) for e in examples] == [
        ("好,很好", "5", 0, "csv:2"),
        ("差", "1", 1, "csv:3"),
    ]
    (tmp_path / "d.tsv").write_text("review\tstars\n好\t5\n", encoding="utf-8")
    assert [e.label for e in task.read(tmp_path / "d.tsv")] == ["5"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\n好,1\n,0\n", r"d\.csv:3: no value in field 'text'"),
        ("text,label\n好,1\n坏,0,多\n", r"d\.csv:3: more cells than the 2 header columns"),
        ("txt,label\n好,1\n", r"d\.csv:2: missing field 'text'"),
        ("text,label\n好,1\n坏,3\n", r"d\.csv:3: unknown label '3'"),
    ],
)
def test_csv_errors_name_file_and_line(content, message, tmp_path):
    (tmp_path / "d.csv").write_text(content, encoding="utf-8")
    task = CustomClassificationTask(labels=["0", "1"])
    with pytest.raises(DataError, match=message):
        task.read(tmp_path / "d.csv")


def test_unlabelled_rows_and_unsupported_files(tmp_path):
    (tmp_path / "test.csv").write_text("text,label\n好,\n", encoding="utf-8")
    assert CustomClassificationTask(labels=["0", "1"]).read(tmp_path / "test.csv")[0].label is None
    (tmp_path / "a.json").write_text('[{"text": "好", "label": "1"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:1: this is one JSON array"):
        CustomClassificationTask().read(tmp_path / "a.json")
    (tmp_path / "a.xlsx").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        CustomClassificationTask().read(tmp_path / "a.xlsx")


def test_saved_dataset_folder_uses_class_label_names(tmp_path):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": ["好", "差"], "label": [1, 0]}, features=features),
        test=datasets.Dataset.from_dict({"sentence": ["中"], "label": [-1]}, features=features),
    )
    data.save_to_disk(str(tmp_path / "saved"))
    task = CustomClassificationTask(text_field="sentence")
    with pytest.raises(DataError, match="holds several splits .'test', 'train'.: pass the split folder"):
        task.read(tmp_path / "saved")
    train = task.read(tmp_path / "saved" / "train")
    assert task.labels == ["neg", "pos"]  # the ClassLabel order, not sorted strings
    assert [(e.fields["text"], e.label, e.source[-5:]) for e in train] == [
        ("好", "pos", "row:1"),
        ("差", "neg", "row:2"),
    ]
    assert [e.label for e in task.read(tmp_path / "saved" / "test")] == [None]  # ClassLabel -1: no label
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]"):
        CustomClassificationTask().read(tmp_path / "saved" / "train")


def test_load_dataset_builder_on_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "train.csv").write_text("text,label\n好,pos\n差,neg\n", encoding="utf-8")
    task = CustomClassificationTask(
        dataset="csv", dataset_kwargs={"data_files": {"train": str(tmp_path / "train.csv")}}
    )
    examples = task.read("train")
    assert [(e.fields["text"], e.label) for e in examples] == [("好", "pos"), ("差", "neg")]
    assert task.labels == ["neg", "pos"]
    with pytest.raises(DataError, match=r"csv\[validation\] row: cannot load the dataset split"):
        task.read("validation")


def test_custom_end_to_end(tok, tmp_path):
    rows = [{"text": "今天很好" * (i + 1), "label": lab} for i, lab in enumerate(["好", "坏", "好"])]
    task = get_task("custom")
    examples = task.read(jsonl(tmp_path / "train.jsonl", rows))
    features = task.encode(examples, tok, max_length=16)
    batch = task.collate(features)
    from transformers import BertModel

    torch.manual_seed(0)
    model = TaskModel.for_task(
        task, BertModel(tiny_bert_config(vocab_size=len(char_vocab())), add_pooling_layer=False)
    )
    logits = model(**batch.inputs)
    task.loss(logits, batch).backward()
    assert logits.shape == (3, 2) and model.head.dense.weight.grad.abs().sum() > 0
    predictions = task.decode(logits.detach(), batch)
    gold = [task.labels.index(e.label) for e in examples]
    assert task.score(examples, features, predictions)["accuracy"] == sum(
        p == g for p, g in zip(predictions, gold, strict=True)
    ) / len(gold)
    assert [r["id"] for r in task.submission(examples, features, predictions)] == [0, 1, 2]
