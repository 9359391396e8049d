"""The baselines behind the method interface: each trains a tiny model, round-trips save/load bit-exactly, LoRA merges
exactly, fine-tuned folders reload in plain transformers, prompt tuning keeps the input length, and budget matching
on the BERT-base shape lands within 5% of FL-tuning's count (or says why not)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from arch_zoo import BACKBONE_CONFIGS, TINY_BERT_KW, V
from safetensors.torch import load_file, save_file

from fltuning.methods.base import METHOD_WEIGHTS_NAME, MethodError, build_method, load_method_config
from fltuning.methods.budget import (
    count_on_meta,
    fl_num_trainable,
    format_budget_table,
    match_budget,
)
from fltuning.methods.lora import block_linear_layers

CONFIGS = {kind: BACKBONE_CONFIGS[kind] for kind in ("bert", "llama", "gpt2")}
METHODS = {
    "ptuning_v2": dict(num_prompts=4),
    "prompt_tuning": dict(num_virtual_tokens=4),
    "lora": dict(r=4, dropout=0.0),
    "finetune": {},
}
BERT_BASE_BUDGET = 2_960_256  # FL-tuning, k = 160, on BERT-base: 12 x (2 x 768 x 160 + 160 + 768)


def build(kind: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return T.AutoModel.from_config(CONFIGS[kind]()).eval()


def inputs(kind: str = "bert") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        batch["token_type_ids"] = torch.zeros_like(ids)
        batch["token_type_ids"][:, 3:] = 1
    return batch


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def train(model, batch, steps: int = 5) -> tuple[float, float]:
    """A few Adam steps on a toy regression of ``last_hidden_state``; the loss before and after (eval mode)."""
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))

    def loss_fn():
        return F.mse_loss(model(**batch).last_hidden_state, target)

    model.eval()
    with torch.no_grad():
        before = loss_fn().item()
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return before, loss_fn().item()


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("name", list(METHODS))
def test_trains_and_round_trips_save_load_bit_exactly(name, kind, tmp_path):
    method = build_method(name, **METHODS[name])
    model = method.apply(build(kind))
    batch = inputs(kind)
    assert hidden(model, batch).shape == (3, 6, 32)  # prompt methods strip their virtual positions
    before, after = train(model, batch)
    assert after < before
    trained = hidden(model, batch)
    method.save(model, tmp_path)

    reloaded_method = load_method_config(tmp_path)
    assert reloaded_method.settings() == method.settings()
    torch.manual_seed(123)  # the fresh method starts from other random values
    fresh = reloaded_method.apply(build(kind, seed=0 if name != "finetune" else 7))
    assert not torch.equal(hidden(fresh, batch), trained)
    reloaded_method.load(fresh, tmp_path)
    assert torch.equal(hidden(fresh, batch), trained)


def test_only_the_method_tensors_train():
    for name in ("prompt_tuning", "lora"):
        method = build_method(name, **METHODS[name])
        model = method.apply(build("bert"))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trainable) == len(method.trainable_state_dict(model)) > 0
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        train(model, inputs())
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    method = build_method("finetune")
    model = method.apply(build("bert"))
    assert all(p.requires_grad for p in model.parameters())
    assert method.num_trainable(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_lora_merge_and_unload_equals_unmerged(kind):
    method = build_method("lora", r=4)
    model = method.apply(build(kind))
    batch = inputs(kind)
    train(model, batch, steps=3)
    unmerged = hidden(model, batch)
    merged = method.merge_and_unload(model)
    assert type(merged) is type(build(kind)) and not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(hidden(merged, batch), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_default_targets_are_the_attention_and_ffn_projections():
    bert = block_linear_layers(build("bert"))
    assert {n.split("layer.0.", 1)[1] for n in bert if ".layer.0." in n} == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert len(bert) == 12 and "pooler.dense" not in bert
    llama = block_linear_layers(build("llama"))
    assert {n.removeprefix("layers.0.") for n in llama if n.startswith("layers.0.")} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    gpt2 = block_linear_layers(build("gpt2"))
    assert {n.removeprefix("h.0.") for n in gpt2 if n.startswith("h.0.")} == {
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    }
    method = build_method("lora", r=2)
    model = method.apply(build("bert"))
    per_layer = 2 * (4 * (32 + 32) + (32 + 64) + (64 + 32))  # r x (in + out) for q, k, v, o, up, down
    assert method.num_trainable(model) == 2 * per_layer
    assert "encoder.layer.0.output.dense.lora_A.weight" in method.trainable_state_dict(model)


def test_lora_target_override():
    method = build_method("lora", r=2, target_modules=["query", "value"])
    model = method.apply(build("bert"))
    assert len(method.trainable_state_dict(model)) == 2 * 2 * 2
    with pytest.raises(MethodError, match="target_modules"):
        build_method("lora", target_modules=["no_such_layer"]).apply(build("bert"))


def test_finetune_folder_reloads_with_plain_from_pretrained(tmp_path):
    method = build_method("finetune")
    model = method.apply(build("bert"))
    batch = inputs()
    train(model, batch, steps=2)
    method.save(model, tmp_path)
    assert {"config.json", "model.safetensors", "method_config.json"} <= {p.name for p in tmp_path.iterdir()}
    reloaded = T.AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is T.BertModel
    assert torch.equal(hidden(reloaded, batch), hidden(model, batch))
    assert method.merge_and_unload(model) is model


def test_prompt_tuning_strips_virtual_tokens_and_keeps_segments():
    method = build_method("prompt_tuning", num_virtual_tokens=5)
    model = method.apply(build("bert"))
    batch = inputs()
    out = model(**batch, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 6, 32) and all(h.shape == (3, 6, 32) for h in out.hidden_states)
    no_segments = {k: v for k, v in batch.items() if k != "token_type_ids"}
    assert not torch.allclose(hidden(model, no_segments), out.last_hidden_state)  # token types reach the model
    with torch.no_grad():
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            alone = model(
                input_ids=batch["input_ids"][i : i + 1, :n], token_type_ids=batch["token_type_ids"][i : i + 1, :n]
            ).last_hidden_state
            torch.testing.assert_close(out.last_hidden_state[i, :n], alone[0], atol=1e-5, rtol=1e-5)
    # explicit positions are shifted past the prompt, as the model numbers them itself
    positions = torch.arange(6).expand(3, -1)
    torch.testing.assert_close(hidden(model, batch | {"position_ids": positions}), out.last_hidden_state.detach())
    assert method.unload(model).__class__ is T.BertModel


def test_prompt_tuning_inits():
    base = build("bert")
    words = base.get_input_embeddings().weight
    model = build_method("prompt_tuning", num_virtual_tokens=6).apply(base)  # sample_vocab: rows of the vocabulary
    prompt = model.prompt.embedding.weight
    assert all(any(torch.equal(row, w) for w in words) for row in prompt)
    with pytest.raises(MethodError, match="init_text"):
        build_method("prompt_tuning", init="text")
    with pytest.raises(MethodError, match="init"):
        build_method("prompt_tuning", init="uniform")


@pytest.mark.parametrize("name", list(METHODS))
def test_loading_another_shape_names_the_tensor(name, tmp_path):
    small = build_method(name, **METHODS[name])
    small.save(small.apply(build("bert")), tmp_path)
    wider = {"ptuning_v2": dict(num_prompts=5), "prompt_tuning": dict(num_virtual_tokens=5), "lora": dict(r=5)}
    if name == "finetune":
        other_model = build_method(name).apply(T.BertModel(T.BertConfig(**(TINY_BERT_KW | {"intermediate_size": 48}))))
        with pytest.raises(
            MethodError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(64, 32\).*\(48, 32\)"
        ):
            build_method(name).load(other_model, tmp_path)
        return
    other = build_method(name, **wider[name])
    other_model = other.apply(build("bert"))
    with pytest.raises(MethodError, match=r"tensor '.*(ptuning_v2\.key|prompt_embeddings|lora_A\.weight)'"):
        other.load(other_model, tmp_path)


def test_missing_corrupt_and_foreign_files(tmp_path):
    method = build_method("ptuning_v2", num_prompts=2)
    model = method.apply(build("bert"))
    with pytest.raises(MethodError, match=METHOD_WEIGHTS_NAME + " is missing"):
        method.load(model, tmp_path)
    with pytest.raises(MethodError, match=r"model\.safetensors is missing"):
        build_method("finetune").load(build("bert"), tmp_path)
    (tmp_path / METHOD_WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(MethodError, match="not a readable safetensors file"):
        method.load(model, tmp_path)
    state = method.trainable_state_dict(model)
    save_file(
        {"surplus": torch.zeros(1)} | {k: v.detach() for k, v in list(state.items())[1:]},
        str(tmp_path / METHOD_WEIGHTS_NAME),
    )
    with pytest.raises(MethodError, match=r"missing \['encoder\.layer\.0.*unexpected \['surplus'\]"):
        method.load(model, tmp_path)


def test_saved_files_hold_only_the_method_tensors(tmp_path):
    for name in ("ptuning_v2", "prompt_tuning", "lora"):
        method = build_method(name, **METHODS[name])
        model = method.apply(build("bert"))
        method.save(model, tmp_path / name)
        saved = load_file(str(tmp_path / name / METHOD_WEIGHTS_NAME))
        assert set(saved) == set(method.trainable_state_dict(model))
        meta = json.loads((tmp_path / name / "method_config.json").read_text())
        assert meta == {"method": name, "settings": method.settings()}


def test_budget_matching_on_the_bert_base_shape():
    config = T.BertConfig()  # 12 layers, hidden 768, 12 heads, intermediate 3072
    assert fl_num_trainable(config, 160) == BERT_BASE_BUDGET
    rows = {row.method: row for row in match_budget(config, BERT_BASE_BUDGET)}
    print("\n" + format_budget_table(list(rows.values())))
    assert rows["ptuning_v2"].size == 161 and rows["ptuning_v2"].count == 161 * 12 * 2 * 768
    assert rows["lora"].size == 18 and rows["lora"].count == 18 * 12 * (4 * 2 * 768 + 2 * (768 + 3072))
    for name in ("ptuning_v2", "lora"):
        assert abs(rows[name].ratio - 1) < 0.05 and rows[name].note == ""
    # prompt tuning would need ~3,854 virtual tokens (more than BERT's 512 positions): capped, and the table says so
    assert rows["prompt_tuning"].size == 100 and rows["prompt_tuning"].count == 100 * 768
    assert rows["prompt_tuning"].note == "capped: the budget needs num_virtual_tokens=3854"
    assert rows["finetune"].size is None and rows["finetune"].count > 100_000_000
    if "fl" in rows:
        assert rows["fl"].count == BERT_BASE_BUDGET


@pytest.mark.parametrize("name", ["ptuning_v2", "prompt_tuning", "lora"])
def test_meta_counts_equal_real_counts(name):
    """The budget counts (meta-device builds) are the counts of a real model."""
    config = CONFIGS["llama"]()
    method = build_method(name, **METHODS[name])
    assert count_on_meta(config, method) == method.num_trainable(method.apply(build("llama")))
