"""Each benchmark script runs end to end on tiny shapes in seconds (the numbers themselves are not asserted)."""

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ffn_designs_benchmark_runs_tiny(tmp_path, monkeypatch):
    out = tmp_path / "ffn.json"
    monkeypatch.setattr(sys, "argv", ["ffn_designs.py", "--tiny", "--out", str(out)])
    runpy.run_path(str(ROOT / "benchmarks/speed/ffn_designs.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert {r["design"] for r in rows} == {"frozen", "side", "widened", "widened_weight", "side_inplace"}
    assert all(r["ms"] > 0 for r in rows)
