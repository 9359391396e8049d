"""Shared fixtures: tiny models built from configs and an offline character tokenizer. No network anywhere."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FLTUNING_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def _load_char_vocab():
    """``char_vocab`` of ``benchmarks/paper/tiny.py`` (the harness's tiny model uses the same vocabulary): specials,
    [unused1..99], ASCII, full-width punctuation and every CJK unified ideograph (U+4E00..U+9FFF)."""
    spec = importlib.util.spec_from_file_location("_paper_tiny", REPO_ROOT / "benchmarks" / "paper" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.char_vocab


char_vocab = _load_char_vocab()


@pytest.fixture(scope="session")
def char_tokenizer(tmp_path_factory):
    """A BERT-style fast tokenizer that splits Chinese into characters, built offline from ``char_vocab``."""
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(char_vocab()) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True, tokenize_chinese_chars=True)


def tiny_bert_config(vocab_size: int = 1000, **overrides):
    from transformers import BertConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.fixture
def tiny_bert():
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_bert_config()).eval()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data folder {DATA_DIR} not found (set FLTUNING_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def zh_tokenizer(char_tokenizer):
    return char_tokenizer


@pytest.fixture(scope="session")
def sp_tokenizer():
    """An XLM-R-style tokenizer (Unigram + Metaspace "▁", ``<s> A </s> </s> B </s>``) with multi-character pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁", "北京", "欢迎", "你", "北", "京", "▁我", "爱", "在"]
    backend = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -3.0) for p in pieces], unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and spinning OpenMP threads stall when other jobs hold the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_tiny_model(folder: Path, hidden_size: int = 32, dropout: float = 0.1) -> Path:
    """A tiny random BERT (2 layers) with the character tokenizer, saved as a standard transformers folder: what a
    run's ``--model.name`` can point at. Dropout is on, so that runs exercise the RNG state."""
    from transformers import BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(char_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True)
    torch.manual_seed(0)
    config = tiny_bert_config(
        vocab_size=len(char_vocab()),
        hidden_size=hidden_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))
