"""Adapter folders: what is written, bit-exact round trips (in a fresh process too), and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from arch_zoo import ARCHS, logits, perturb_fl
from safetensors.torch import load_file, save_file

from fltuning.config import ConfigError, FLTuningConfig
from fltuning.model import AdapterLoadError, FLModel, get_fl_model

BERT = ARCHS[0]


def _trained(tmp_path: Path, **kw) -> tuple[FLModel, Path]:
    fm = get_fl_model(BERT.build(), FLTuningConfig(num_units=5, modules_to_save=["classifier"], **kw))
    perturb_fl(fm)
    with torch.no_grad():
        for name, p in fm.named_parameters():
            if "modules_to_save" in name:
                p.add_(1.0)  # the head copy differs from the base head
    out = tmp_path / "adapter"
    fm.save_pretrained(out)
    return fm, out


def test_folder_holds_only_config_and_adapter_tensors(tmp_path):
    fm, out = _trained(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLTUNING" and config["num_units"] == 5
    assert config["fltuning_version"] and config["base_ffn"]["model_type"] == "bert"
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") and "default" not in k for k in keys)
    n_fl = sum(1 for k in keys if ".fl_" in k)
    assert n_fl == 2 * 2 * 2  # 2 layers x (up, down) x (weight, bias)
    assert {k for k in keys if "classifier" in k} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }


def test_round_trip_is_bit_exact_in_a_fresh_process_with_another_seed(tmp_path):
    fm, out = _trained(tmp_path)
    base_dir = tmp_path / "base"
    BERT.build().save_pretrained(base_dir)  # the same base weights the adapter was trained on
    inputs = BERT.inputs()
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    expected = logits(fm, inputs)
    script = textwrap.dedent(f"""
        import torch, transformers
        from safetensors.torch import load_file, save_file
        from fltuning.model import FLModel
        torch.manual_seed(12345)
        base = transformers.BertForSequenceClassification.from_pretrained({str(base_dir)!r}).eval()
        model = FLModel.from_pretrained(base, {str(out)!r})
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        with torch.no_grad():
            save_file({{"logits": model(**inputs).logits}}, {str(tmp_path / "out.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], expected)


def test_round_trip_restores_head_and_is_frozen_unless_trainable(tmp_path):
    fm, out = _trained(tmp_path)
    torch.manual_seed(99)
    loaded = FLModel.from_pretrained(BERT.build(), out)
    assert torch.equal(logits(loaded, BERT.inputs()), logits(fm, BERT.inputs()))
    assert loaded.count_parameters()["trainable"] == 0
    trainable = FLModel.from_pretrained(BERT.build(), out, is_trainable=True)
    assert trainable.count_parameters()["fl"] == 2 * (2 * 32 * 5 + 5 + 32)
    assert trainable.count_parameters()["head"] == 32 * 3 + 3


def test_named_adapters_go_to_subfolders_without_leaking(tmp_path):
    fm = get_fl_model(BERT.build(), FLTuningConfig(num_units=5))
    fm.add_adapter("default2", FLTuningConfig(num_units=3))
    fm.add_adapter("efaul", FLTuningConfig(num_units=2))
    perturb_fl(fm)
    fm.save_pretrained(tmp_path)
    for name, k in [("default", 5), ("default2", 3), ("efaul", 2)]:
        folder = tmp_path if name == "default" else tmp_path / name
        state = load_file(str(folder / "adapter_model.safetensors"))
        ups = [v for key, v in state.items() if key.endswith("intermediate.dense.fl_weight")]
        assert ups and all(v.shape[0] == k for v in ups), name
    loaded = FLModel.from_pretrained(BERT.build(), tmp_path)
    loaded.load_adapter(tmp_path / "default2", "default2")
    for name in ("default", "default2"):
        fm.set_adapter(name)
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, BERT.inputs()), logits(fm, BERT.inputs()))


def test_adapter_for_other_ffn_shapes_is_refused(tmp_path):
    _, out = _trained(tmp_path)
    import copy

    config = copy.deepcopy(BERT.config)
    config.intermediate_size = 48
    other = type(BERT.build())(config)
    with pytest.raises(AdapterLoadError, match="FFN shapes differ"):
        FLModel.from_pretrained(other, out)


def test_missing_or_corrupt_weights_file_is_a_clear_error(tmp_path):
    _, out = _trained(tmp_path)
    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="corrupt"):
        FLModel.from_pretrained(BERT.build(), out)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterLoadError, match="corrupt"):
        FLModel.from_pretrained(BERT.build(), out)
    weights.unlink()
    with pytest.raises(AdapterLoadError, match="missing"):
        FLModel.from_pretrained(BERT.build(), out)
    with pytest.raises(ConfigError, match="not an FL-tuning adapter folder"):
        FLModel.from_pretrained(BERT.build(), tmp_path / "nowhere")


def test_tensor_shape_mismatch_names_the_tensor(tmp_path):
    _, out = _trained(tmp_path)
    weights = out / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("fl_weight"))
    state[key] = torch.zeros(7, 7)
    save_file(state, str(weights))
    with pytest.raises(AdapterLoadError, match="fl_weight has shape"):
        FLModel.from_pretrained(BERT.build(), out)


def test_config_from_a_future_version_is_refused(tmp_path):
    _, out = _trained(tmp_path)
    path = out / "adapter_config.json"
    data = json.loads(path.read_text()) | {"format_version": 2, "fltuning_version": "3.0.0"}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="upgrade fltuning"):
        FLModel.from_pretrained(BERT.build(), out)
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        FLModel.from_pretrained(BERT.build(), out)


def test_failed_load_adapter_leaves_the_model_unchanged(tmp_path):
    fm, out = _trained(tmp_path)
    (out / "adapter_model.safetensors").unlink()
    before = logits(fm, BERT.inputs())
    with pytest.raises(AdapterLoadError):
        fm.load_adapter(out, "second")
    assert list(fm.peft_config) == ["default"]
    assert torch.equal(logits(fm, BERT.inputs()), before)
