"""A tiny random BERT with a character tokenizer, for running the whole harness in seconds (``run.py --tiny``).

The folder is a standard transformers folder (``save_pretrained``), so the harness loads it like any model folder:
2 layers, hidden 32, FFN 64, and a vocabulary of specials, ASCII, full-width punctuation and every CJK ideograph.
"""

from __future__ import annotations

from pathlib import Path

# The settings ``--tiny`` puts on top of every cell: a few examples, 2 epochs, small batches.
TINY_SETTINGS = {
    "data.max_train_examples": 16,
    "data.max_dev_examples": 16,
    "data.max_test_examples": 24,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.grad_accum": 1,
    "train.eval_every": 0,
    "train.eval_batch_size": 16,
}


def char_vocab() -> list[str]:
    """Specials, [unused1..99], ASCII, full-width punctuation and every CJK unified ideograph (U+4E00..U+9FFF)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"[unused{i}]" for i in range(1, 100)]
    ascii_chars = [chr(c) for c in range(33, 127)]
    fullwidth = list("，。！？；：、（）《》“”‘’【】…—～·")
    cjk = [chr(c) for c in range(0x4E00, 0xA000)]
    return specials + ascii_chars + fullwidth + cjk


def build_tiny_model(folder: Path) -> Path:
    """Write the tiny model into ``folder`` (once; an existing folder with a config is reused) and return it."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(char_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True, tokenize_chinese_chars=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
