"""Which FL-unit design is faster on this CPU: a side branch of two small matmuls, or widened up/down projections?

Times forward + backward (input gradients on, as inside a network whose earlier layers train) of one FFN:

- ``frozen``: the plain frozen FFN, the floor.
- ``side``: FFN(x) + act(x U1 + c1) U2 + c2, a separate branch using the FFN's activation: what fltuning runs
  where the architecture table names the activation (fltuning.layers, the fast path).
- ``widened``: FLUp / FLDown unlinked (fltuning's generic path): cat([x W1 + b1, x U1 + c1]) -> act -> split into
  W2 and U2.
- ``widened_weight``: one matmul with cat([W1; U1]) built every step (autograd then computes the full weight
  gradient of the concatenated weight, frozen rows included).
- ``side_inplace``: the side branch accumulated into the frozen down projection's output by one in-place
  ``addmm_`` (with c2 folded into its bias), which saves the branch's separate bias and add passes over the
  (tokens x d) output.

    python benchmarks/speed/ffn_designs.py            # e5-small and BERT-base FFN shapes, 16 x 128 tokens
    python benchmarks/speed/ffn_designs.py --units 32 --repeats 30 --out benchmarks/speed/results/ffn_designs_k32.json
    python benchmarks/speed/ffn_designs.py --tiny     # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fltuning.layers import FLDown, FLUp
from fltuning.train.run import cpu_model


def build(d: int, d_ff: int, k: int):
    torch.manual_seed(0)
    up, down, act = nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.GELU()
    for p in [*up.parameters(), *down.parameters()]:
        p.requires_grad_(False)
    fl_up, fl_down = FLUp(up), FLDown(down)
    for layer in (fl_up, fl_down):
        layer.add_adapter("a", k, bias=True, init="paper", init_std=0.02)
        layer.active_adapters = ["a"]
    u1, c1 = fl_up.fl_weight["a"], fl_up.fl_bias["a"]
    u2, c2 = fl_down.fl_weight["a"], fl_down.fl_bias["a"]

    def frozen(x):
        return down(act(up(x)))

    def side(x):
        return down(act(up(x))) + F.linear(act(F.linear(x, u1, c1)), u2, c2)

    def widened(x):
        return fl_down(act(fl_up(x)))

    def widened_weight(x):
        h = act(F.linear(x, torch.cat([up.weight, u1]), torch.cat([up.bias, c1])))
        return down(h[..., :d_ff]) + F.linear(h[..., d_ff:], u2, c2)

    def side_inplace(x):
        out = F.linear(act(up(x)), down.weight, down.bias + c2)
        return out.addmm_(act(F.linear(x, u1, c1)), u2.t())

    return {
        "frozen": frozen,
        "side": side,
        "widened": widened,
        "widened_weight": widened_weight,
        "side_inplace": side_inplace,
    }


def time_step(fn, tokens: int, d: int, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        x = torch.randn(tokens, d, requires_grad=True)
        start = time.perf_counter()
        fn(x).sum().backward()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a few repeats (for tests)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--units", type=int, default=160, help="k, the FL units per layer")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ffn_designs.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = (
        [("tiny", 32, 64, 8, 64)]
        if args.tiny
        else [("e5-small", 384, 1536, args.units, 2048), ("bert-base", 768, 3072, args.units, 2048)]
    )
    repeats = 2 if args.tiny else args.repeats
    rows = []
    for name, d, d_ff, k, tokens in shapes:
        designs = build(d, d_ff, k)
        # interleave designs over rounds so machine noise hits them alike
        samples: dict[str, list[float]] = {n: [] for n in designs}
        for _ in range(3):
            for design, fn in designs.items():
                samples[design].append(time_step(fn, tokens, d, repeats))
        floor = statistics.median(samples["frozen"])
        for design, values in samples.items():
            t = statistics.median(values)
            rows.append(
                {
                    "shape": name,
                    "d": d,
                    "d_ff": d_ff,
                    "k": k,
                    "tokens": tokens,
                    "design": design,
                    "ms": round(1e3 * t, 2),
                    "vs_frozen": round(t / floor, 3),
                }
            )
            print(f"{name:10s} d={d:4d} d_ff={d_ff:5d} k={k:4d}  {design:15s} {1e3 * t:8.2f} ms  x{t / floor:.3f}")
        print(f"{'':10s} extra FLOP share of the units (fwd + input grad + weight grad): {(3 * k) / (2 * d_ff):.3f}")
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": cpu_model(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
