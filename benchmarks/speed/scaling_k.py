"""How FL-tuning's training step time and peak memory grow with the number of units k and with sequence length.

k = 0 is the floor every FL run pays: the frozen backbone with gradients flowing through every layer down to the first
FFN's output (where the units of layer 0 need them), and the trained head. For k > 0 the growth over that floor,
``t(k) / t(0) - 1`` (paired by round, harness.py), is compared with the extra matmul FLOP share of the units,
``3 U / (2 L + 3 A)`` (flops.py): the target is growth <= share. A step and the timing / memory method are
described in harness.py.

    python benchmarks/speed/scaling_k.py                 # e5-small, k 0..1024, seq 64..512, batch 16 (~10 min)
    python benchmarks/speed/scaling_k.py --tiny          # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import copy

import harness
from flops import layer_flops


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5-small")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, short shapes, one round")
    parser.add_argument("--units", type=int, nargs="+", default=[0, 32, 160, 512, 1024])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    tiny = {"units": [0, 8], "seqs": [16], "batch": 2, "rounds": 1, "memory": False}
    args, out = harness.parse_args(parser, argv, "scaling_k", tiny)

    backbone = harness.load_backbone(args.model)
    config = backbone.config
    steps = {}
    for k in args.units:
        model, _ = harness.build_variant("frozen" if k == 0 else "fl", copy.deepcopy(backbone), k)
        steps[k] = harness.TrainStep(model, {})
    del backbone
    rows = []
    for seq in args.seqs:
        for step in steps.values():
            step.batch = harness.make_batch(config, args.batch, seq)
        samples = harness.time_interleaved({str(k): steps[k] for k in args.units}, args.rounds, args.max_wait)
        floor = samples.get("0")
        for k in args.units:
            row = {"seq": seq, "k": k, "batch": args.batch} | harness.summary(samples[str(k)])
            row["flop_share"] = round(layer_flops(config, seq, k).share_train, 4)
            if floor is not None:
                row["growth"] = round(harness.paired_ratio(samples[str(k)], floor) - 1, 4)
                row["within_share"] = row["growth"] <= row["flop_share"]
            if args.memory:
                spec = {"model": args.model, "variant": "frozen" if k == 0 else "fl", "batch": args.batch, "seq": seq}
                row |= harness.peak_memory(spec | {"num_units": k}, args.threads)
            rows.append(row)
            growth = f"growth {row['growth']:+.3f} (FLOP share {row['flop_share']:.3f})" if "growth" in row else ""
            memory = f"  peak {row['peak_mb']:.0f} MiB" if "peak_mb" in row else ""
            print(f"seq {seq:4d}  k {k:5d}  {row['median_s']:7.3f} s  {growth}{memory}", flush=True)
    result = {"benchmark": "scaling_k", "model": args.model, "rows": rows, "machine": harness.machine()}
    harness.save(result, out)
    return result


if __name__ == "__main__":
    main()
