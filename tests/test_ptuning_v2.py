"""P-tuning v2's contract: a layer equals the hand-written prompted attention, padding and causality survive the
custom attention name, no prompts means the base model, only the prompts train, GQA and decoders work, unload restores
the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from arch_zoo import BACKBONE_CONFIGS, V

from fltuning.methods.base import MethodError, build_method
from fltuning.methods.ptuning_v2 import ATTENTION_NAME, PTuningV2, prompted_attention

CONFIGS = BACKBONE_CONFIGS


def build(kind: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return T.AutoModel.from_config(CONFIGS[kind]()).eval()


def inputs(batch: int = 3, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding
    mask[2, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def prompted(kind: str, num_prompts: int = 3, seed: int = 0):
    method = PTuningV2(num_prompts=num_prompts)
    model = method.apply(build(kind, seed))
    return method, model.eval()


def test_bert_layer_equals_hand_computation():
    """softmax(Q [Kp;K]^T / sqrt(d) + [0;mask]) [Vp;V], then BERT's output dense + LayerNorm and FFN, by hand."""
    method, model = prompted("bert", num_prompts=3)
    layer = model.encoder.layer[0]
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    batch = inputs()
    model(**batch)

    x, sa = seen["x"], layer.attention.self  # (B, T, H)
    b, t, _ = x.shape
    heads, d = sa.num_attention_heads, sa.attention_head_size

    def split(y):  # (B, T, H) -> (B, heads, T, d)
        return y.view(b, t, heads, d).transpose(1, 2)

    q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
    pk = sa.ptuning_v2.key.transpose(0, 1).expand(b, -1, -1, -1)  # (P, heads, d) -> (B, heads, P, d)
    pv = sa.ptuning_v2.value.transpose(0, 1).expand(b, -1, -1, -1)
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    visible = torch.cat([torch.ones(b, 3), batch["attention_mask"].float()], dim=1)  # prompts always visible
    bias = (1.0 - visible)[:, None, None, :] * -1e9
    probs = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    context = (probs @ values).transpose(1, 2).reshape(b, t, heads * d)
    attention_out = layer.attention.output(context, x)
    expected = layer.output(layer.intermediate(attention_out), attention_out)

    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_prompted_attention_equals_hand_computation_with_gqa_and_causal_mask():
    """LLaMA layout: 4 query heads share 2 key/value heads, prompts have 2 heads; every query sees every prompt,
    real keys stay causal and padded."""
    _, model = prompted("llama", num_prompts=5)
    attn = model.layers[0].self_attn
    prompts = attn.ptuning_v2
    assert prompts.key.shape == (5, 2, 8)
    g = torch.Generator().manual_seed(0)
    b, t = 2, 4
    q, k, v = (torch.randn(b, n, t, 8, generator=g) for n in (4, 2, 2))
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    padding = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    mask = (causal[None] & padding[:, None, :])[:, None]  # (B, 1, T, T), what transformers hands the function

    out, _ = prompted_attention(attn, q, k, v, mask, scaling=attn.scaling, dropout=0.0)

    keys = torch.cat([prompts.key.transpose(0, 1).expand(b, -1, -1, -1), k], dim=2).repeat_interleave(2, dim=1)
    values = torch.cat([prompts.value.transpose(0, 1).expand(b, -1, -1, -1), v], dim=2).repeat_interleave(2, dim=1)
    full_mask = torch.cat([torch.ones(b, 1, t, 5, dtype=torch.bool), mask], dim=-1)
    scores = (q @ keys.transpose(-1, -2) * attn.scaling).masked_fill(~full_mask, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)  # (B, T, heads, d)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_padded_batch_equals_each_example_alone(kind):
    """Catches the mask trap: without a mask function under the custom attention name, padding is attended to."""
    _, model = prompted(kind, num_prompts=4)
    batch = inputs()
    with torch.no_grad():
        together = model(**batch).last_hidden_state
        assert together.shape == (3, 6, 32)  # the prompts are not in the output
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            alone = model(input_ids=batch["input_ids"][i : i + 1, :n]).last_hidden_state
            torch.testing.assert_close(together[i, :n], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_no_prompts_equal_the_base_model_and_unload_restores_it(kind):
    base = build(kind)
    batch = inputs()
    with torch.no_grad():
        expected = base(**batch).last_hidden_state
    method, model = prompted(kind, num_prompts=0)
    assert method.trainable_state_dict(model) != {} and method.num_trainable(model) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, expected, atol=1e-6, rtol=1e-6)

    method, model = prompted(kind, num_prompts=3)
    assert model.config._attn_implementation == ATTENTION_NAME
    with torch.no_grad():
        assert not torch.allclose(model(**batch).last_hidden_state, expected, atol=1e-4)
    restored = method.unload(model)
    assert restored.config._attn_implementation == "sdpa"
    assert method.trainable_state_dict(restored) == {}
    with torch.no_grad():
        assert torch.equal(restored(**batch).last_hidden_state, expected)


def test_causal_queries_see_every_prompt():
    """The first token of a decoder attends to the prompts (and itself) only: changing a prompt value moves it."""
    method, model = prompted("llama", num_prompts=2)
    ids = inputs()["input_ids"][:1]
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state[0, 0].clone()
        model.layers[0].self_attn.ptuning_v2.value[1].add_(1.0)  # the last prompt
        after = model(input_ids=ids).last_hidden_state[0, 0]
    assert not torch.allclose(before, after, atol=1e-4)


def test_cached_decoding_equals_one_full_pass():
    """The prompts are not written into the KV cache, and every decoding step sees them once."""
    _, model = prompted("llama", num_prompts=3)
    ids = inputs()["input_ids"][:1]
    with torch.no_grad():
        full = model(input_ids=ids).last_hidden_state
        first = model(input_ids=ids[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], cache=first.past_key_values, use_cache=True)
    torch.testing.assert_close(
        torch.cat([first.last_hidden_state, rest.last_hidden_state], 1), full, atol=1e-5, rtol=1e-5
    )


def test_eager_models_keep_eager_and_agree_with_sdpa():
    _, sdpa = prompted("bert", num_prompts=3)
    eager_base = build("bert")
    eager_base.set_attn_implementation("eager")
    torch.manual_seed(0)
    method = PTuningV2(num_prompts=3)
    eager = method.apply(eager_base).eval()
    method.load_trainable_state_dict(eager, method.trainable_state_dict(sdpa))
    batch = inputs()
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
        torch.testing.assert_close(out.last_hidden_state, sdpa(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert out.attentions[0].shape == (3, 4, 6, 3 + 6)  # weights over [prompts; tokens]
    assert method.unload(eager).config._attn_implementation == "eager"


def test_only_prompts_train_and_base_is_bit_identical():
    method, model = prompted("bert", num_prompts=4)
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "ptuning_v2" not in n}
    prompts_before = {n: p.detach().clone() for n, p in method.trainable_state_dict(model).items()}
    assert set(prompts_before) == {
        f"encoder.layer.{i}.attention.self.ptuning_v2.{w}" for i in (0, 1) for w in ("key", "value")
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(prompts_before)
    assert method.num_trainable(model) == 2 * 2 * 4 * 32

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs()
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        loss = F.mse_loss(model(**batch).last_hidden_state, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for name, p in model.named_parameters():
        if name in base_before:
            assert p.grad is None and torch.equal(p, base_before[name]), name
    for name, p in method.trainable_state_dict(model).items():
        assert not torch.equal(p, prompts_before[name]), name


def test_prompt_init_and_dropout():
    torch.manual_seed(0)
    method, model = prompted("bert", num_prompts=200)
    key = model.encoder.layer[0].attention.self.ptuning_v2.key
    assert key.abs().max() <= 0.04 and 0.015 < key.std() < 0.02  # N(0, 0.02) truncated at 2 std
    prompts = model.encoder.layer[0].attention.self.ptuning_v2
    prompts.train()
    k, _ = prompts(batch_size=2, dtype=torch.float32)
    dropped = (k == 0).float().mean()
    assert 0.05 < dropped < 0.15 and not torch.equal(k[0], k[1])  # p = 0.1, a mask per example
    prompts.eval()
    k, _ = prompts(batch_size=2, dtype=torch.float32)
    assert torch.equal(k[0], key.transpose(0, 1))


def test_errors():
    with pytest.raises(MethodError, match="num_prompts"):
        build_method("ptuning_v2", num_prompts=-1)
    method, model = prompted("bert")
    with pytest.raises(MethodError, match="already applied"):
        method.apply(model)
    with pytest.raises(MethodError, match="needs a transformers model"):
        method.apply(torch.nn.Linear(2, 2))
    assert build_method("ptuning_v2", **method.settings()) == method
