"""Tiny models of every architecture in the FFN table, built from configs (no network)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import transformers as T

V = 101  # vocabulary size of every tiny model


@dataclass
class Arch:
    name: str
    config: Any
    model_cls: Any  # a class with a head, for reload-after-merge checks
    act: str  # path of the activation module relative to the FFN block
    gated: bool = False

    def build(self, seed: int = 0):
        torch.manual_seed(seed)
        return self.model_cls(copy.deepcopy(self.config)).eval()  # merging edits the model's config

    def inputs(self, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, V, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # some padding
        out = {"input_ids": ids, "attention_mask": mask}
        if self.name.startswith("t5"):
            out["decoder_input_ids"] = ids[:, :4]
        return out


def _bert_like(cfg_cls, **kw):
    return cfg_cls(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=0,
        **kw,
    )


def _t5_config(feed_forward_proj: str):
    return T.T5Config(
        vocab_size=V,
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0,
        pad_token_id=0,
    )


ARCHS = [
    Arch("bert", _bert_like(T.BertConfig), T.BertForSequenceClassification, "intermediate.intermediate_act_fn"),
    Arch(
        "roberta",
        _bert_like(T.RobertaConfig, max_position_embeddings=64),
        T.RobertaForSequenceClassification,
        "intermediate.intermediate_act_fn",
    ),
    Arch(
        "xlm-roberta",
        _bert_like(T.XLMRobertaConfig, max_position_embeddings=64),
        T.XLMRobertaForSequenceClassification,
        "intermediate.intermediate_act_fn",
    ),
    Arch(
        "roformer",
        _bert_like(T.RoFormerConfig, embedding_size=32),
        T.RoFormerForSequenceClassification,
        "intermediate.intermediate_act_fn",
    ),
    Arch(
        "distilbert",
        T.DistilBertConfig(
            vocab_size=V,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            num_labels=3,
            pad_token_id=0,
        ),
        T.DistilBertForSequenceClassification,
        "ffn.activation",
    ),
    Arch(
        "albert",
        T.AlbertConfig(
            vocab_size=V,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout_prob=0.0,
            num_labels=3,
            pad_token_id=0,
        ),
        T.AlbertForSequenceClassification,
        "activation",
    ),
    Arch(
        "gpt2",
        T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        T.GPT2LMHeadModel,
        "mlp.act",
    ),
    Arch(
        "llama",
        T.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        T.LlamaForCausalLM,
        "mlp.act_fn",
        gated=True,
    ),
    Arch(
        "qwen2",
        T.Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        T.Qwen2ForCausalLM,
        "mlp.act_fn",
        gated=True,
    ),
    Arch("t5", _t5_config("relu"), T.T5ForConditionalGeneration, "act"),
    Arch("t5-gated", _t5_config("gated-gelu"), T.T5ForConditionalGeneration, "act", gated=True),
]
ARCH_IDS = [a.name for a in ARCHS]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def perturb_fl(fl_model, scale: float = 0.2, seed: int = 7):
    """Give every FL tensor, biases included, a large random value so merges are tested for real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fl_model.named_parameters():
            if ".fl_weight." in name or ".fl_bias." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


TINY_BERT_KW = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    max_position_embeddings=64,
)
DECODER_KW = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
)
# backbones (no head) for the method tests: P-tuning v2 and the other baselines
BACKBONE_CONFIGS = {
    "bert": lambda: T.BertConfig(**TINY_BERT_KW),
    "roberta": lambda: T.RobertaConfig(**TINY_BERT_KW, pad_token_id=1),
    "xlm-roberta": lambda: T.XLMRobertaConfig(**TINY_BERT_KW, pad_token_id=1),
    "distilbert": lambda: T.DistilBertConfig(
        vocab_size=V,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=64,
    ),
    "llama": lambda: T.LlamaConfig(**DECODER_KW),  # GQA: 4 query heads, 2 key/value heads
    "qwen2": lambda: T.Qwen2Config(**DECODER_KW),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}
