"""GlobalPointer and CLUENER: scores and loss equal hand computations, token spans map back to characters, hand-set
logits decode to the expected spans and P/R/F1, unencodable entities count as misses, the real files parse."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_bert_config

from fltuning.tasks.base import Batch, DataError
from fltuning.tasks.global_pointer import (
    MASK_VALUE,
    GlobalPointer,
    global_pointer_loss,
    multilabel_categorical_crossentropy,
    token_char_spans,
)
from fltuning.tasks.model import TaskModel
from fltuning.tasks.ner import CLUENER_TYPES, NERTask

pytestmark = pytest.mark.usefixtures("one_thread")


def write_lines(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- GlobalPointer


def rope_by_hand(vector, position):
    """Rotate dimension pairs (2m, 2m+1) by position * 10000^(-2m/d), one scalar at a time."""
    d = len(vector)
    out = [0.0] * d
    for m in range(d // 2):
        angle = position * 10000 ** (-2 * m / d)
        out[2 * m] = vector[2 * m] * math.cos(angle) - vector[2 * m + 1] * math.sin(angle)
        out[2 * m + 1] = vector[2 * m + 1] * math.cos(angle) + vector[2 * m] * math.sin(angle)
    return out


def test_global_pointer_scores_equal_hand_computation():
    torch.manual_seed(0)
    heads, d, hidden_size, length = 2, 4, 5, 4
    head = GlobalPointer(hidden_size, heads=heads, head_size=d)
    assert head.dense.bias is None and head.dense.weight.abs().max() <= 0.04  # no bias, truncated at 2 std
    with torch.no_grad():
        head.dense.weight.normal_()  # O(1) weights so the rotation visibly matters
    hidden = torch.randn(1, length, hidden_size)
    mask = torch.tensor([[1, 1, 1, 0]])
    scores = head(hidden, {"attention_mask": mask})
    assert scores.shape == (1, heads, length, length)

    weight, x = head.dense.weight.tolist(), hidden[0].tolist()
    projected = [[sum(w * v for w, v in zip(row, x[t], strict=True)) for row in weight] for t in range(length)]
    for h in range(heads):
        chunk = [p[h * 2 * d : (h + 1) * 2 * d] for p in projected]  # bert4keras: per head [q; k]
        q = [rope_by_hand(c[:d], t) for t, c in enumerate(chunk)]
        k = [rope_by_hand(c[d:], t) for t, c in enumerate(chunk)]
        for i in range(length):
            for j in range(length):
                if j >= i and i < 3 and j < 3:
                    expected = sum(a * b for a, b in zip(q[i], k[j], strict=True)) / math.sqrt(d)
                    assert scores[0, h, i, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
                else:  # padding or end < start
                    assert scores[0, h, i, j].item() <= -0.99 * MASK_VALUE / math.sqrt(d)


def test_global_pointer_scores_depend_on_relative_position_only():
    torch.manual_seed(1)
    head = GlobalPointer(6, heads=1, head_size=8)
    token_a, token_b = torch.randn(6), torch.randn(6)
    at_start = torch.stack([token_a, token_b, torch.randn(6)])[None]
    shifted = torch.stack([torch.randn(6), torch.randn(6), token_a, token_b])[None]
    assert head(shifted, {})[0, 0, 2, 3].item() == pytest.approx(head(at_start, {})[0, 0, 0, 1].item(), rel=1e-5)


def test_multilabel_crossentropy_equals_hand_computation():
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0, -MASK_VALUE]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]])
    # log(1 + sum over negatives of e^s) + log(1 + sum over positives of e^-s); the masked score adds nothing
    expected = math.log(1 + math.exp(-1.0) + math.exp(0.5)) + math.log(1 + math.exp(-2.0) + math.exp(3.0))
    assert multilabel_categorical_crossentropy(targets, scores).item() == pytest.approx(expected, rel=1e-6)

    grid = torch.tensor([[[[1.0, -2.0], [-MASK_VALUE, 0.0]], [[-1.0, 3.0], [-MASK_VALUE, -4.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]])
    row0 = math.log(1 + math.exp(-2.0) + math.exp(0.0)) + math.log(1 + math.exp(-1.0))
    row1 = math.log(1 + math.exp(-1.0) + math.exp(3.0)) + math.log(1 + math.exp(4.0))
    assert global_pointer_loss(grid, labels).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_token_char_spans_with_sentencepiece_markers(sp_tokenizer):
    text = "北京欢迎你"
    encoding = sp_tokenizer(text, return_offsets_mapping=True)
    tokens = sp_tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    assert tokens == ["<s>", "▁", "北京", "欢迎", "你", "</s>"]
    assert encoding["offset_mapping"][1] == (0, 1)  # the lone "▁" claims the first character...
    keep = [s == 0 for s in encoding.sequence_ids()]
    spans = token_char_spans(encoding["offset_mapping"], keep, text)
    assert spans == [None, None, (0, 2), (2, 4), (4, 5), None]  # ...but it overlaps "北京", so it owns nothing
    text = "我 爱 北京"
    encoding = sp_tokenizer(text, return_offsets_mapping=True)
    keep = [s == 0 for s in encoding.sequence_ids()]
    spans = token_char_spans(encoding["offset_mapping"], keep, text)
    assert [text[s:e] for s, e in filter(None, spans)] == ["我", "爱", "北京"]  # spaces belong to no token


# ---------------------------------------------------------------------------------------------------- CLUENER

FIXTURE = [
    {
        "text": "北京大学的张三在上海",  # nested organization / address; 上海 is truncated away below
        "label": {
            "organization": {"北京大学": [[0, 3]]},
            "address": {"北京": [[0, 1]], "上海": [[8, 9]]},
            "name": {"张三": [[5, 6]]},
        },
    },
    {
        "text": "我在abc公司",  # "abc" is one [UNK] token, so "bc公司" cannot be represented
        "label": {"game": {"abc": [[2, 4]]}, "company": {"bc公司": [[3, 6]]}},
    },
]
T = {name: i for i, name in enumerate(CLUENER_TYPES)}


@pytest.fixture
def ner_fixture(tmp_path, zh_tokenizer):
    task = NERTask()
    examples = task.read(write_lines(tmp_path / "ner.jsonl", FIXTURE))
    features = task.encode(examples, zh_tokenizer, max_length=10)
    return task, examples, features


def test_encode_maps_entities_to_tokens_and_counts_unencodable(ner_fixture):
    task, examples, features = ner_fixture
    assert examples[0].label == [("address", 0, 1), ("organization", 0, 3), ("name", 5, 6), ("address", 8, 9)]
    first, second = features
    assert len(first["input_ids"]) == 10  # [CLS] + 8 characters + [SEP]
    assert first["char_spans"][1:9] == [[i, i + 1] for i in range(8)] and first["char_spans"][0] is None
    assert sorted(first["labels"]) == sorted([[T["address"], 1, 2], [T["organization"], 1, 4], [T["name"], 6, 7]])
    assert first["unencoded"] == 1  # 上海 was truncated
    assert second["char_spans"][3] == [2, 5]  # [UNK] for "abc"
    assert second["labels"] == [[T["game"], 3, 3]] and second["unencoded"] == 1


def test_encode_with_sentencepiece_tokens(sp_tokenizer, tmp_path):
    task = NERTask()
    path = write_lines(tmp_path / "sp.jsonl", [{"text": "北京欢迎你", "label": {"address": {"北京": [[0, 1]]}}}])
    path2 = write_lines(tmp_path / "sp2.jsonl", [{"text": "北京欢迎你", "label": {"address": {"京欢": [[1, 2]]}}}])
    (feature,) = task.encode(task.read(path), sp_tokenizer, max_length=32)
    assert feature["labels"] == [[T["address"], 2, 2]] and feature["unencoded"] == 0  # "北京" is token 2
    (feature,) = task.encode(task.read(path2), sp_tokenizer, max_length=32)
    assert feature["labels"] == [] and feature["unencoded"] == 1  # boundary inside the pieces 北京 | 欢迎


def test_decode_and_score_hand_set_logits(ner_fixture):
    task, examples, features = ner_fixture
    batch = task.collate(features)
    logits = torch.full((2, len(CLUENER_TYPES), 10, 10), -5.0)
    hits = [
        (0, "organization", 1, 4),  # 北京大学: right
        (0, "address", 1, 2),  # 北京: right
        (0, "name", 6, 8),  # 张三在: wrong boundary -> one false positive and one miss
        (1, "game", 3, 3),  # abc: right
        (1, "company", 3, 5),  # abc公司: wrong -> false positive (the gold bc公司 cannot be encoded)
    ]
    for b, name, i, j in hits:
        logits[b, T[name], i, j] = 3.0
    logits[0, T["name"], 0, 0] = 9.0  # [CLS]: no characters, never decoded
    logits[0, T["book"], 4, 2] = 9.0  # end before start
    logits[1, T["book"], 6, 8] = 9.0  # [SEP] and padding
    predictions = task.decode(logits, batch)
    assert sorted(predictions[0]) == sorted([(T[n], i, j) for b, n, i, j in hits if b == 0])
    assert sorted(predictions[1]) == sorted([(T[n], i, j) for b, n, i, j in hits if b == 1])

    result = task.score(examples, features, predictions)
    # gold 6 (4 + 2), predicted 5, correct 3: the truncated 上海 and the unencodable bc公司 are misses
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["recall"] == pytest.approx(3 / 6)
    assert result["f1"] == pytest.approx(2 * 3 / (5 + 6))
    assert result["f1_address"] == pytest.approx(2 * 1 / (1 + 2))
    assert result["f1_organization"] == 1.0 and result["f1_game"] == 1.0
    assert result["f1_name"] == 0.0 and result["f1_company"] == 0.0 and result["f1_book"] == 0.0
    assert result["unencoded"] == 2

    records = task.submission(examples, features, predictions)
    assert records == [
        {
            "id": 0,
            "label": {
                "address": {"北京": [[0, 1]]},
                "name": {"张三在": [[5, 7]]},
                "organization": {"北京大学": [[0, 3]]},
            },
        },
        {"id": 1, "label": {"company": {"abc公司": [[2, 6]]}, "game": {"abc": [[2, 4]]}}},
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "北京", "label": {', "not valid JSON"),
        ('{"label": {}}', 'missing or empty "text"'),
        ('{"text": "北京大学", "label": {"address": {"北京": [[1, 2]]}}}', "is '京大', not '北京'"),
        ('{"text": "北京", "label": {"city": {"北京": [[0, 1]]}}}', "unknown entity type 'city'"),
        ('{"text": "北京", "label": {"address": {"北京": [[0, 5]]}}}', "bad span"),
    ],
)
def test_read_rejects_bad_lines_with_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "好", "label": {}}', line])
    with pytest.raises(DataError, match=message) as error:
        NERTask().read(path)
    assert str(error.value).startswith(f"{path}:2:")


def test_end_to_end_tiny_bert_learns_the_fixture(ner_fixture, zh_tokenizer):
    from transformers import BertModel

    task, examples, features = ner_fixture
    torch.manual_seed(0)
    model = TaskModel.for_task(task, BertModel(tiny_bert_config(vocab_size=len(zh_tokenizer))))
    batch = task.collate(features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = task.loss(model(**batch.inputs), batch)
        optimizer.zero_grad()
        loss.backward()
        assert model.head.dense.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    model.eval()
    with torch.no_grad():
        predictions = task.decode(model(**batch.inputs), batch)
    result = task.score(examples, features, predictions)
    # every encodable entity is found; the two that cannot be encoded stay misses: R = 4/6
    assert result["precision"] == 1.0 and result["recall"] == pytest.approx(4 / 6)


def test_test_file_without_labels(tmp_path, zh_tokenizer):
    task = NERTask()
    examples = task.read(write_lines(tmp_path / "test.jsonl", [{"id": 7, "text": "北京"}]))
    assert examples[0].uid == 7 and examples[0].label is None
    batch = task.collate(task.encode(examples, zh_tokenizer, max_length=16))
    assert "labels" not in batch.targets and isinstance(batch, Batch)


def test_real_cluener_files(data_dir, zh_tokenizer):
    folder = data_dir / "cluener2020"
    if not folder.is_dir():
        pytest.skip("cluener2020 not in the data folder")
    task = NERTask()
    train, dev, test = (task.read(folder / f"{split}.jsonl") for split in ("train", "dev", "test"))
    assert (len(train), len(dev), len(test)) == (10748, 1343, 1345)
    assert {t for e in train for t, _, _ in e.label} == set(CLUENER_TYPES)
    assert all(e.label is None for e in test) and test[0].uid == 0
    # Oracle predictions (the encoded gold) score P = 1 and R = 1 - unencoded / gold on characters.
    features = task.encode(dev, zh_tokenizer, max_length=256)
    oracle = [[tuple(label) for label in f["labels"]] for f in features]
    result = task.score(dev, features, oracle)
    gold = sum(len(e.label) for e in dev)
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx(1 - result["unencoded"] / gold)
    assert result["unencoded"] < 0.02 * gold
