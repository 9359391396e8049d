"""Render the speed results (benchmarks/speed/results/*.json) as the markdown tables of docs/performance.md, and
judge each target of the performance issue from the same numbers.

    python benchmarks/speed/report.py                    # all results found; targets judged on e5-small, 2 threads
    python benchmarks/speed/report.py --tag e5-small_t1  # targets judged on the 1-thread results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import paired_ratio, summary
from train_step import ratios

RESULTS = Path(__file__).parent / "results"
TRAIN_VARIANTS = ("finetune", "fl", "ptuning_v2", "lora", "prompt_tuning", "fl_widened", "lora_nodrop")


def load(results: Path, benchmark: str, tag: str) -> dict | None:
    path = results / f"{benchmark}_{tag}.json"
    return refresh(json.loads(path.read_text())) if path.is_file() else None


def refresh(result: dict) -> dict:
    """Recompute every median and ratio from the raw samples with the current rules (harness.summary,
    harness.paired_ratio), so results saved by an earlier version of a script are judged alike."""
    kind = result.get("benchmark")
    for row in result.get("rows", []):
        if "samples" in row:
            row |= summary(row["samples"], result["machine"]["threads"])
    if kind == "train_step":
        result["ratios"] = ratios(result["rows"])
    elif kind == "ceiling":
        by_name = {row["name"]: row for row in result["rows"]}
        for row in result["rows"]:
            row["gflops_per_s"] = row["gflop"] / row["median_s"]
        result["gemm_fraction_of_step"] = paired_ratio(by_name["same_gemms"]["samples"], by_name["fl_step"]["samples"])
    elif kind == "inference":
        for row in result["rows"]:
            row["ms"], row["sequences_per_s"] = 1e3 * row["median_s"], row["batch"] / row["median_s"]
            base = next(b for b in result["rows"] if b["batch"] == row["batch"] and b["variant"] == "base")
            row["vs_base"] = paired_ratio(row["samples"], base["samples"])
            row["cpu_vs_base"] = paired_ratio(row["samples"], base["samples"], 1)
    elif kind == "scaling_k":
        for row in result["rows"]:
            floor = next((f for f in result["rows"] if f["seq"] == row["seq"] and f["k"] == 0), None)
            if floor is not None:
                row["growth"] = paired_ratio(row["samples"], floor["samples"]) - 1
                row["within_share"] = row["growth"] <= row["flop_share"]
    return result


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def background_note(rows: list[dict]) -> str:
    """How loaded the machine was: other processes' median share of the cores during the timed calls."""
    shares = sorted(r["background"] for r in rows if "background" in r)
    if not shares:
        return ""
    clean = sum(r.get("clean", 0) for r in rows)
    calls = sum(len(r.get("samples", [])) for r in rows)
    return (
        f"\n\nOther processes used a median {shares[len(shares) // 2]:.0%} of the cores during these calls; "
        f"{clean} of {calls} calls were clean (other processes left each torch thread its core; harness.py)."
    )


def train_step_tables(result: dict) -> str:
    rows_by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for row in result["rows"]:
        rows_by_shape.setdefault((row["batch"], row["seq"]), {})[row["variant"]] = row
    present = [v for v in TRAIN_VARIANTS if any(v in at for at in rows_by_shape.values())]
    times, memory = [], []
    for (batch, seq), at in rows_by_shape.items():
        fl = at.get("fl", {})
        times.append(
            [f"{batch} x {seq}"]
            + [_cell(at.get(v), "median_s", "{:.3f}") for v in present]
            + [_paired(fl, at.get(v)) for v in ("finetune", "ptuning_v2", "lora")]
        )
        memory.append(
            [f"{batch} x {seq}"]
            + [_cell(at.get(v), "peak_mb", "{:.0f}") for v in present]
            + [_ratio(fl, at.get("finetune"), "peak_mb")]
        )
    out = [
        "Step time (s, median):\n",
        table(["batch x seq", *present, "FL / finetune", "FL / P-tuning v2", "FL / LoRA"], times),
        "\nPeak resident memory (MiB):\n",
        table(["batch x seq", *present, "FL / finetune"], memory),
    ]
    loaded = {r["variant"]: r["loaded_mb"] for r in result["rows"] if "loaded_mb" in r}
    out.append("\nResident before the first step (MiB): " + ", ".join(f"{v} {m:.0f}" for v, m in loaded.items()))
    out.append(background_note([r for r in result["rows"] if "median_s" in r]).lstrip("\n"))
    sizes = {r["variant"]: (r["settings"], r["trainable"]) for r in result["rows"] if "settings" in r}
    out.append("\nSizes: " + "; ".join(f"{v} {_size(s)} ({n:,} trainable)" for v, (s, n) in sizes.items()))
    return "\n".join(out)


def _cell(row: dict | None, key: str, fmt: str) -> str:
    """A measured value, "OOM" where the process ran out of memory, "-" where it was not measured."""
    if row is None:
        return "-"
    if key in row:
        return fmt.format(row[key])
    error = row.get("error") or (row.get("memory_error") if key == "peak_mb" else None)
    return "OOM" if error and "out of memory" in error else "-"


def _paired(fl: dict, other: dict | None) -> str:
    return (
        f"{paired_ratio(fl['samples'], other['samples']):.2f}"
        if other and "samples" in fl and "samples" in other
        else "-"
    )


def _ratio(fl: dict, other: dict | None, key: str) -> str:
    return f"{fl[key] / other[key]:.2f}" if other and key in fl and key in other else "-"


def _size(settings: dict) -> str:
    for key in ("num_units", "num_prompts", "r", "num_virtual_tokens"):
        if key in settings:
            return f"{key}={settings[key]}" + (f", dropout={settings['dropout']}" if key == "r" else "")
    return "all weights"


def scaling_table(result: dict) -> str:
    rows = [
        [
            str(r["seq"]),
            str(r["k"]),
            f"{r['median_s']:.3f}",
            f"{r.get('growth', 0):+.3f}",
            f"{r['flop_share']:.3f}",
            "yes" if r.get("within_share", True) else "no",
            f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
        ]
        for r in result["rows"]
    ]
    header = ["seq", "k", "step (s)", "growth over k=0", "FLOP share", "growth <= share", "peak MiB"]
    return table(header, rows) + background_note(result["rows"])


def inference_table(result: dict) -> str:
    rows = [
        [
            str(r["batch"]),
            r["variant"],
            f"{r['ms']:.2f}",
            f"{r['sequences_per_s']:.1f}",
            f"{r['vs_base']:.3f}",
            f"<= {r['target']:.3f}" if "target" in r else "",
        ]
        for r in result["rows"]
    ]
    header = ["batch", "variant", "latency (ms)", "sequences/s", "x base", "target"]
    return table(header, rows) + background_note(result["rows"])


def ceiling_tables(result: dict) -> str:
    rows = [
        [r["name"], f"{r['gflop']:.2f}", f"{r['median_s']:.4f}", f"{r['gflops_per_s']:.1f}"] for r in result["rows"]
    ]
    total = sum(result["profile_s"].values())
    profile = [[kind, f"{s:.3f}", f"{s / total:.1%}"] for kind, s in result["profile_s"].items()]
    return "\n".join(
        [
            table(["work", "GFLOP", "seconds (median)", "GFLOP/s"], rows) + background_note(result["rows"]),
            f"\nThe FL step runs at {result['gemm_fraction_of_step']:.1%} of the speed of its own matmuls alone.\n",
            "Where one profiled FL step spends its time (self CPU time, torch.profiler):\n",
            table(["kind of op", "seconds", "share"], profile),
        ]
    )


def verdicts(results: Path, tag: str) -> str:
    """One row per target of the issue, judged on the results tagged ``tag`` (``<model>_t<threads>``) at batch
    16 x 128 on wall time; the same ratio on CPU
    seconds is shown beside it as a check against the load of other processes."""
    rows = []
    train = load(results, "train_step", tag)
    if train:
        at = {(e["batch"], e["seq"]): e for e in train["ratios"]}.get((16, 128), train["ratios"][0])
        for key, bound, label in [
            ("time_fl_over_finetune", 0.70, "FL step <= 0.70 x full fine-tuning"),
            ("time_fl_over_ptuning_v2", 1.00, "FL step <= 1.0 x P-tuning v2 (equal budget)"),
            ("time_fl_over_lora", 1.10, "FL step <= 1.10 x LoRA (equal budget, dropout 0.1)"),
            ("time_fl_over_lora_nodrop", 1.10, "FL step <= 1.10 x LoRA (equal budget, dropout 0)"),
            ("memory_fl_over_finetune", 0.60, "FL peak memory <= 0.60 x full fine-tuning"),
        ]:
            if key in at:
                cpu = at.get(key.replace("time_", "cputime_"))
                cpu_text = f"{cpu:.3f}" if cpu is not None and key.startswith("time_") else "-"
                rows.append([label, f"{at[key]:.3f}", cpu_text, f"<= {bound}", _verdict(at[key] <= bound)])
    infer = load(results, "inference", tag)
    if infer:
        for r in infer["rows"]:
            if "target" in r:
                what = "merged" if r["variant"] == "fl_merged" else "unmerged"
                cpu = r["cpu_vs_base"]
                label = f"FL {what} inference, batch {r['batch']} (x base)"
                rows.append([label, f"{r['vs_base']:.3f}", f"{cpu:.3f}", f"<= {r['target']:.3f}", _verdict(r)])
    scaling = load(results, "scaling_k", tag)
    if scaling:
        judged = [r for r in scaling["rows"] if r["k"] > 0 and "within_share" in r]
        within = sum(r["within_share"] for r in judged)
        label = "FL step growth over k = 0 <= the units' FLOP share"
        rows.append([label, f"{within}/{len(judged)} shapes", "-", "all", _verdict(within == len(judged))])
    return table(["target", "measured (wall)", "same on CPU seconds", "bound", "verdict"], rows)


def _verdict(met: bool | dict) -> str:
    if isinstance(met, dict):
        met = met["vs_base"] <= met["target"]
    return "met" if met else "missed"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--tag", default="e5-small_t2", help="the results the targets are judged on: <model>_t<threads>"
    )
    args = parser.parse_args(argv)
    parts = [f"## Targets ({args.tag}, batch 16 x 128)\n", verdicts(args.results, args.tag)]
    for path in sorted(args.results.glob("*.json")):
        result = refresh(json.loads(path.read_text()))
        render = {
            "train_step": train_step_tables,
            "scaling_k": scaling_table,
            "inference": inference_table,
            "ceiling": ceiling_tables,
        }.get(result.get("benchmark"))
        if render:
            parts += [f"\n## {path.name}\n", render(result)]
    text = "\n".join(parts) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
