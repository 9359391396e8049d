"""The FL-tuning contract on every architecture of the table: FFN' equals the hand-written formula, identity at zero
init, only FL and head tensors train, counts equal the formula, merge is exact and reloads in plain transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from arch_zoo import ARCH_IDS, ARCHS, logits, perturb_fl

from fltuning.architectures import find_ffn_blocks
from fltuning.config import ConfigError, FLTuningConfig
from fltuning.layers import weight_out_in
from fltuning.model import FLModel, get_fl_model


def _fl(arch, **kw):
    kw.setdefault("num_units", 5)
    return get_fl_model(arch.build(), FLTuningConfig(**kw))


def _units(p, x):
    """x W1 + b1 (the base units) and x U1 + c1 (the FL units) of an up or gate projection, by hand."""
    base = F.linear(x, weight_out_in(p.base_layer), p.base_layer.bias)
    return base, F.linear(x, p.fl_weight["default"], p.fl_bias.get("default"))


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_ffn_output_equals_hand_written_formula(arch):
    fm = _fl(arch)
    perturb_fl(fm)
    _, blocks = find_ffn_blocks(fm.base_model)
    seen = []
    hooks = []
    for block in blocks:
        proj = {role: module for role, (_, module) in block.projections.items()}
        act = fm.base_model.get_submodule(block.name).get_submodule(arch.act)
        record = {"x": [], "out": [], "proj": proj, "act": act}
        hooks.append(proj["up"].register_forward_pre_hook(lambda m, a, r=record: r["x"].append(a[0])))
        hooks.append(proj["down"].register_forward_hook(lambda m, a, o, r=record: r["out"].append(o)))
        seen.append(record)
    fm(**arch.inputs())
    for h in hooks:
        h.remove()
    for record in seen:
        proj, act = record["proj"], record["act"]
        assert record["x"], "the FFN was never called"
        for x, out in zip(record["x"], record["out"], strict=True):
            up_base, up_fl = _units(proj["up"], x)
            if arch.gated:
                gate_base, gate_fl = _units(proj["gate"], x)
                h_base, h_fl = act(gate_base) * up_base, act(gate_fl) * up_fl
            else:
                h_base, h_fl = act(up_base), act(up_fl)
            down = proj["down"]
            b2 = down.base_layer.bias
            c2 = down.fl_bias.get("default")
            expected = F.linear(h_base, weight_out_in(down.base_layer), b2)
            expected = expected + F.linear(h_fl, down.fl_weight["default"], c2)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_zero_init_is_identity_and_paper_init_is_not(arch):
    inputs = arch.inputs()
    base = logits(arch.build(), inputs)
    torch.testing.assert_close(logits(_fl(arch, init="zero"), inputs), base, atol=1e-6, rtol=0)
    assert not torch.allclose(logits(_fl(arch, init="paper"), inputs), base, atol=1e-7)


def test_paper_init_is_truncated_normal_with_zero_biases():
    fm = get_fl_model(ARCHS[0].build(), FLTuningConfig(num_units=4000, init_std=0.02))
    for _, layer in fm._fl_layers():
        w = layer.fl_weight["default"]
        assert w.abs().max() <= 0.04 + 1e-7
        assert 0.015 < w.std() < 0.02  # a normal truncated at 2 std has std 0.88 * 0.02
        assert torch.count_nonzero(layer.fl_bias["default"]) == 0


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_only_fl_and_head_tensors_train_and_base_is_bit_identical(arch):
    head = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head"}.get(arch.name.split("-")[0])
    fm = _fl(arch, modules_to_save=[head] if head else None)
    before = {
        k: v.clone() for k, v in fm.base_model.state_dict().items() if ".fl_" not in k and "modules_to_save" not in k
    }
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        out = fm(**arch.inputs())
        out.logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for name, p in fm.named_parameters():
        is_adapter = ".fl_weight." in name or ".fl_bias." in name or ".modules_to_save." in name
        assert p.requires_grad == is_adapter, name
    after = fm.base_model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def test_parameter_count_equals_formula_on_bert_base_shape():
    with torch.device("meta"):
        fm = get_fl_model(T.BertModel(T.BertConfig()), FLTuningConfig(num_units=160))
    assert fm.count_parameters()["fl"] == 12 * (2 * 768 * 160 + 160 + 768) == 2_960_256


def test_parameter_count_gated_bias_free_and_target_layers():
    cfg = T.LlamaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=50
    )
    with torch.device("meta"):
        fm = get_fl_model(T.LlamaModel(cfg), FLTuningConfig(num_units=16))
        assert fm.count_parameters()["fl"] == 4 * 3 * 64 * 16  # gate, up, down; no biases (bias="auto")
        fm2 = get_fl_model(T.LlamaModel(cfg), FLTuningConfig(num_units=16, target_layers=[0, 2]))
        assert fm2.count_parameters()["fl"] == 2 * 3 * 64 * 16
        gpt = get_fl_model(T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=3, n_head=4)), FLTuningConfig(num_units=8))
        assert gpt.count_parameters()["fl"] == 3 * (2 * 32 * 8 + 8 + 32)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_merge_unmerge_and_merge_and_unload_are_exact(arch, tmp_path):
    fm = _fl(arch)
    perturb_fl(fm)
    inputs = arch.inputs()
    expected = logits(fm, inputs)
    base_state = {k: v.clone() for k, v in fm.base_model.state_dict().items()}
    fm.merge_adapter()
    torch.testing.assert_close(logits(fm, inputs), expected, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        fm.merge_adapter()
    fm.unmerge_adapter()
    for k, v in fm.base_model.state_dict().items():
        assert torch.equal(v, base_state[k]), f"unmerge changed {k}"
    torch.testing.assert_close(logits(fm, inputs), expected, atol=1e-5, rtol=1e-5)
    plain = fm.merge_and_unload()
    assert not any("fl_" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = arch.model_cls.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-5, rtol=1e-5)


def test_merged_width_key_grows_by_k_for_each_architecture():
    keys = {
        "bert": "intermediate_size",
        "distilbert": "hidden_dim",
        "gpt2": "n_inner",
        "llama": "intermediate_size",
        "t5": "d_ff",
    }
    for arch in ARCHS:
        if arch.name not in keys:
            continue
        key = keys[arch.name]
        before = getattr(arch.config, key) or 4 * arch.config.n_embd
        plain = _fl(arch, num_units=6).merge_and_unload()
        assert getattr(plain.config, key) == before + 6


def test_untargeted_layers_are_padded_or_merge_refuses():
    arch = ARCHS[0]
    inputs = arch.inputs()
    fm = _fl(arch, target_layers=[1])
    perturb_fl(fm)
    expected = logits(fm, inputs)
    with pytest.raises(ValueError, match="pad_untargeted"):
        fm.merge_and_unload(pad_untargeted=False)
    torch.testing.assert_close(logits(fm, inputs), expected)  # the refused merge changed nothing
    plain = fm.merge_and_unload()
    assert plain.bert.encoder.layer[0].intermediate.dense.out_features == 64 + 5
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_weights():
    for bad in (float("nan"), float("inf")):
        fm = _fl(ARCHS[0])
        layer = next(layer for _, layer in fm._fl_layers())
        with torch.no_grad():
            layer.fl_weight["default"][0, 0] = bad
        state = {k: v.clone() for k, v in fm.base_model.state_dict().items()}
        with pytest.raises(ValueError, match="NaNs detected"):
            fm.merge_adapter(safe_merge=True)
        assert all(torch.equal(v, state[k]) for k, v in fm.base_model.state_dict().items() if "fl_" not in k)


def test_bias_all_on_bias_free_ffn_refuses_merge():
    fm = _fl(next(a for a in ARCHS if a.name == "llama"), bias="all")
    with pytest.raises(ValueError, match="cannot merge exactly"):
        fm.merge_adapter()


def test_unknown_architecture_error_lists_what_was_searched():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.mlp = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="no FFN layout known"):
        get_fl_model(Tiny(), FLTuningConfig(num_units=2))
    with pytest.raises(ConfigError, match="searched ffn_modules"):
        get_fl_model(
            Tiny(),
            FLTuningConfig(num_units=2, ffn_modules={"block": r"blocks\.(?P<index>\d+)", "up": "a", "down": "b"}),
        )


def test_user_named_ffn_modules_work_on_a_custom_model():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.fc_out(torch.relu(self.fc_in(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig(ffn_width=16)
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8)
    fm = get_fl_model(
        net,
        FLTuningConfig(
            num_units=4,
            ffn_modules={
                "block": r"blocks\.(?P<index>\d+)",
                "up": "fc_in",
                "down": "fc_out",
                "width_key": "ffn_width",
            },
        ),
    )
    perturb_fl(fm)
    expected = fm(x)
    plain = fm.merge_and_unload()
    assert plain.config.ffn_width == 20
    torch.testing.assert_close(plain(x), expected, atol=1e-6, rtol=1e-6)


def test_multiple_adapters_switch_disable_and_delete():
    arch = ARCHS[0]
    inputs = arch.inputs()
    base = logits(arch.build(), inputs)
    fm = _fl(arch, modules_to_save=["classifier"])
    fm.add_adapter("other", FLTuningConfig(num_units=3, modules_to_save=["classifier"]))
    perturb_fl(fm)
    out_default = logits(fm, inputs)
    assert fm.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in fm.named_parameters() if ".other" in n)
    fm.set_adapter("other")
    out_other = logits(fm, inputs)
    assert not torch.allclose(out_default, out_other)
    assert all(p.requires_grad for n, p in fm.named_parameters() if n.endswith(".other") or ".other." in n)
    fm.set_adapter("default")
    assert torch.equal(logits(fm, inputs), out_default)
    with fm.disable_adapter():
        torch.testing.assert_close(logits(fm, inputs), base, atol=1e-6, rtol=0)
    assert torch.equal(logits(fm, inputs), out_default)
    fm.merge_adapter()
    with fm.disable_adapter():  # disabling a merged adapter gives the base model too
        torch.testing.assert_close(logits(fm, inputs), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(fm, inputs), out_default, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        fm.delete_adapter("default")
    fm.unmerge_adapter()
    with pytest.raises(ConfigError, match="already exists"):
        fm.add_adapter("other", FLTuningConfig(num_units=2))
    fm.delete_adapter("other")
    assert torch.equal(logits(fm, inputs), out_default)
    assert not any(".other" in n for n, _ in fm.named_parameters())
    with pytest.raises(ConfigError, match="unknown adapter"):
        fm.set_adapter("other")


def test_two_active_adapters_add_up():
    arch = ARCHS[0]
    inputs = arch.inputs()
    fm = _fl(arch, init="zero")
    fm.add_adapter("b", FLTuningConfig(num_units=3, init="zero"))
    perturb_fl(fm)
    fm.set_adapter(["default", "b"])
    both = logits(fm, inputs)
    fm.merge_adapter()
    torch.testing.assert_close(logits(fm, inputs), both, atol=1e-5, rtol=1e-5)
    fm.unmerge_adapter()
    plain = fm.merge_and_unload()
    assert plain.config.intermediate_size == 64 + 5 + 3
    torch.testing.assert_close(logits(plain, inputs), both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    arch = ARCHS[0]
    grads = []
    for checkpointing in (False, True):
        fm = _fl(arch, modules_to_save=["classifier"])
        perturb_fl(fm)
        fm.train()
        if checkpointing:
            fm.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            fm.base_model.enable_input_require_grads()
        fm(**arch.inputs()).logits.sum().backward()
        grads.append({n: p.grad.clone() for n, p in fm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_bf16_base_keeps_fp32_adapters_and_trains():
    arch = next(a for a in ARCHS if a.name == "llama")
    model = arch.build().to(torch.bfloat16)
    fm = get_fl_model(model, FLTuningConfig(num_units=4))
    assert all(p.dtype == torch.float32 for n, p in fm.named_parameters() if ".fl_" in n)
    out = fm(**arch.inputs()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fm.parameters() if p.requires_grad)
    merged = fm.merge_and_unload()
    assert torch.isfinite(logits(merged, arch.inputs())).all()


def test_inputs_embeds_and_generate_work():
    arch = next(a for a in ARCHS if a.name == "llama")
    fm = _fl(arch)
    ids = arch.inputs()["input_ids"]
    emb = fm.get_input_embeddings()(ids)
    torch.testing.assert_close(fm(inputs_embeds=emb).logits, fm(input_ids=ids).logits)
    out = fm.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_config_validation_names_the_field():
    for kwargs, field in [
        ({"num_units": 0}, "num_units"),
        ({"init": "xavier"}, "init"),
        ({"bias": "some"}, "bias"),
        ({"target_layers": [-1]}, "target_layers"),
        ({"target_layers": "("}, "target_layers"),
        ({"modules_to_save": "classifier"}, "modules_to_save"),
        ({"ffn_modules": {"block": "x", "up": "a", "down": "b"}}, "index"),
    ]:
        with pytest.raises(ConfigError, match=field):
            FLTuningConfig(**kwargs)


def test_config_json_round_trip_and_forward_compatibility(tmp_path):
    config = FLTuningConfig(num_units=7, target_layers=[1, 0], init="zero", modules_to_save=["classifier"])
    config.save_pretrained(tmp_path)
    loaded = FLTuningConfig.from_pretrained(tmp_path)
    assert loaded == config and loaded.target_layers == [0, 1]
    data = config.to_dict() | {"some_future_option": 3}
    with pytest.warns(UserWarning, match="some_future_option"):
        assert FLTuningConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="newer than this fltuning"):
        FLTuningConfig.from_dict(config.to_dict() | {"format_version": 99, "fltuning_version": "9.0.0"})


def test_target_layers_regex_and_missing_layers():
    arch = ARCHS[0]
    fm = _fl(arch, target_layers=r".*layer\.1")
    assert fm.targeted_blocks["default"] == ["bert.encoder.layer.1"]
    with pytest.raises(ConfigError, match="do not exist"):
        _fl(arch, target_layers=[5])


def test_fl_model_is_not_pickled_anywhere():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    offenders = [
        p for p in src.rglob("*.py") for bad in ("torch.save(", "torch.load(", "import pickle") if bad in p.read_text()
    ]
    assert not offenders, offenders


def test_from_pretrained_returns_fl_model_type(tmp_path):
    fm = _fl(ARCHS[0])
    fm.save_pretrained(tmp_path)
    loaded = FLModel.from_pretrained(ARCHS[0].build(), tmp_path)
    assert isinstance(loaded, FLModel) and loaded.count_parameters()["trainable"] == 0
