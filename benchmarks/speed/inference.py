"""Inference latency and throughput: the base model, FL-tuning unmerged, and FL-tuning merged (``merge_and_unload``).

Forward passes of the backbone in eval mode under ``torch.inference_mode``, at batch 1 and 32. Variants:
``base``; ``fl`` (k units, unmerged, side branch, what training uses); ``fl_widened`` (unmerged, the generic widened
path); ``fl_merged`` (a plain transformers model whose FFN is k wider). Targets: merged / base <= 1 + the units'
share of the forward FLOPs U / (L + A) (flops.py) + 0.02; unmerged / base <= 1.10. Interleaved timing and ratios
paired by round as in harness.py, one forward per call; batch 1 gets 8 times the rounds.

    python benchmarks/speed/inference.py                 # e5-small, seq 128, batch 1 and 32 (~3 min)
    python benchmarks/speed/inference.py --tiny          # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import copy
import time

import harness
import torch
from flops import layer_flops

from fltuning.methods.base import build_method

VARIANTS = ("base", "fl", "fl_widened", "fl_merged")


def build(backbone: torch.nn.Module, num_units: int) -> dict[str, torch.nn.Module]:
    """The four variants, in eval mode; FL from the paper's init (U2 nonzero, so merging is not trivial)."""
    method = build_method("fl", num_units=num_units)
    models = {"base": backbone, "fl": method.apply(copy.deepcopy(backbone))}
    models["fl_widened"] = method.apply(copy.deepcopy(backbone))
    harness.unlink_side_branch(models["fl_widened"])
    models["fl_merged"] = method.merge_and_unload(method.apply(copy.deepcopy(backbone)))
    return {name: model.eval() for name, model in models.items()}


def forward_timer(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(**batch)
            return time.perf_counter() - start

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5-small")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, one round")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-units", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=9)
    args, out = harness.parse_args(parser, argv, "inference", {"seq": 16, "num_units": 8, "rounds": 1})

    models = build(harness.load_backbone(args.model), args.num_units)
    config = models["base"].config
    share = layer_flops(config, args.seq, args.num_units).share_infer
    rows = []
    for batch in args.batches:
        inputs = {k: v for k, v in harness.make_batch(config, batch, args.seq).items() if k != "labels"}
        timers = {name: forward_timer(model, inputs) for name, model in models.items()}
        rounds = args.rounds * max(1, 8 // batch)  # short forwards: more rounds, one forward per call
        samples = harness.time_interleaved(timers, rounds, args.max_wait)
        for name in VARIANTS:
            row = {"batch": batch, "seq": args.seq, "variant": name} | harness.summary(samples[name])
            row |= {"ms": round(1e3 * row["median_s"], 2), "sequences_per_s": round(batch / row["median_s"], 1)}
            row["vs_base"] = round(harness.paired_ratio(samples[name], samples["base"]), 3)
            if name == "fl_merged":
                row["target"] = round(1 + share + 0.02, 3)
            elif name == "fl":
                row["target"] = 1.10
            rows.append(row)
            target = f"  (target <= {row['target']})" if "target" in row else ""
            print(
                f"batch {batch:3d} x {args.seq}  {name:11s} {row['ms']:9.2f} ms  {row['sequences_per_s']:8.1f} seq/s"
                f"  x{row['vs_base']:.3f}{target}",
                flush=True,
            )
    result = {"benchmark": "inference", "model": args.model, "num_units": args.num_units, "flop_share": share}
    result |= {"rows": rows, "machine": harness.machine()}
    harness.save(result, out)
    return result


if __name__ == "__main__":
    main()
