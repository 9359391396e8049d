"""Each speed benchmark (benchmarks/speed: train_step, scaling_k, inference, ceiling) runs end to end on a tiny random
BERT in seconds and writes the JSON the docs are built from. The timings themselves are not asserted: they are
measurements, not contracts; the FLOP bookkeeping they are judged by is."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


SCRIPTS = ("train_step", "scaling_k", "inference", "ceiling")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> Path:
    """Every benchmark script run once with ``--tiny``, its JSON written to one folder (as results/ is)."""
    folder = tmp_path_factory.mktemp("speed")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(SPEED))  # the scripts import their shared harness.py and flops.py
        for script in SCRIPTS:
            mp.setattr(sys, "argv", [f"{script}.py", "--tiny", "--out", str(folder / f"{script}_tiny.json")])
            runpy.run_path(str(SPEED / f"{script}.py"), run_name="__main__")
    return folder


def read(folder: Path, script: str) -> dict:
    result = json.loads((folder / f"{script}_tiny.json").read_text())
    assert result["machine"]["torch"] and result["model"] == "tiny"
    return result


def test_train_step_runs_tiny_with_every_method_and_memory(tiny_results):
    result = read(tiny_results, "train_step")
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {"finetune", "fl", "ptuning_v2", "lora", "prompt_tuning", "fl_widened", "lora_nodrop"}
    assert all(r["median_s"] > 0 for r in result["rows"])
    fl = next(r for r in result["rows"] if r["variant"] == "fl")
    assert fl["peak_mb"] >= fl["loaded_mb"] > 0
    assert {"time_fl_over_finetune", "time_fl_over_ptuning_v2", "time_fl_over_lora"} <= set(result["ratios"][0])


def test_scaling_k_runs_tiny_and_compares_growth_with_flop_share(tiny_results):
    rows = read(tiny_results, "scaling_k")["rows"]
    assert [r["k"] for r in rows] == [0, 8]
    assert rows[0]["growth"] == 0 and rows[1]["flop_share"] > 0


def test_inference_runs_tiny_with_base_unmerged_and_merged(tiny_results):
    rows = read(tiny_results, "inference")["rows"]
    assert {(r["batch"], r["variant"]) for r in rows} == {
        (b, v) for b in (1, 32) for v in ("base", "fl", "fl_widened", "fl_merged")
    }


def test_ceiling_runs_tiny_with_its_gemms_and_profile(tiny_results):
    result = read(tiny_results, "ceiling")
    assert {r["name"] for r in result["rows"]} == {"fl_step", "same_gemms", "square"}
    assert "matmul" in result["profile_s"]


def test_report_renders_every_table_and_judges_every_target(tiny_results, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SPEED))
    monkeypatch.setattr(sys, "argv", ["report.py", "--results", str(tiny_results), "--tag", "tiny"])
    runpy.run_path(str(SPEED / "report.py"), run_name="__main__")
    text = capsys.readouterr().out
    for script in SCRIPTS:
        assert f"{script}_tiny.json" in text
    # 4 training-step targets (--tiny measures no fine-tuning memory), 4 inference, 1 scaling
    assert text.count("| met |") + text.count("| missed |") == 9


def test_flop_share_formulas_on_e5_small_shapes(monkeypatch):
    monkeypatch.syspath_prepend(str(SPEED))
    from flops import fl_step_flops, forward_flops, layer_flops
    from transformers import BertConfig, LlamaConfig

    e5 = BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536)
    f = layer_flops(e5, 128, 160)
    # by hand: U = 2*384*160*2, L = 2*384*(4*384) + 2*384*1536*2, A = 4*128*384
    assert (f.units, f.linear, f.attention) == (245_760, 3_538_944, 196_608)
    assert f.share_infer == pytest.approx(245_760 / (3_538_944 + 196_608))
    assert f.share_train == pytest.approx(3 * 245_760 / (2 * 3_538_944 + 3 * 196_608))
    assert forward_flops(e5, 2, 128, 160) == 2 * 128 * 12 * (3_538_944 + 196_608 + 245_760)
    first_layer = 3_538_944 + 2 * 196_608 + 2 * 384 * 160  # input grads layer 0 skips
    assert fl_step_flops(e5, 1, 128, 160) == 128 * (12 * (2 * 3_538_944 + 3 * 196_608 + 3 * 245_760) - first_layer)
    llama = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    g = layer_flops(llama, 128, 10)
    assert g.units == 2 * 576 * 10 * 3 and g.linear == 2 * 576 * (2 * 576 + 2 * 192) + 2 * 576 * 1536 * 3
