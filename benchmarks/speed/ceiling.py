"""The hardware ceiling: achieved GFLOP/s of an FL training step against bare matrix multiplies of the same shapes.

Three numbers, in one process, interleaved (harness.py):

- ``fl_step``: one FL training step (k units); its matmul FLOPs come from flops.py.
- ``same_gemms``: exactly the matrix multiplies that step performs (forward, input and weight gradients of every
  linear layer, the attention batched products; layer 0's skipped input gradients left out), run back to back as
  ``torch.mm`` / ``torch.bmm`` on preallocated tensors: the step's matmul work with nothing else around it.
- ``square``: one 2048 x 2048 x 2048 fp32 matmul, what this CPU reaches on an easy shape.

``fl_step / same_gemms`` says how much of the step is matmul at the speed the hardware gives those shapes; the
profile below it (torch.profiler, self CPU time grouped by kind of op) says where the rest goes.

    python benchmarks/speed/ceiling.py                   # e5-small, batch 16 x 128, k 160 (~2 min)
    python benchmarks/speed/ceiling.py --tiny            # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import time

import harness
import torch
from flops import fl_step_flops, shapes
from torch.profiler import ProfilerActivity, profile

# op name -> kind, for the profile of one step (self CPU time); anything else is "other"
OP_KINDS = {
    "aten::mm": "matmul",
    "aten::addmm": "matmul",
    "aten::bmm": "matmul",
    "aten::baddbmm": "matmul",
    "aten::bernoulli_": "dropout",
    "aten::native_dropout": "dropout",
    "aten::mul": "elementwise (mul, add, div, where)",
    "aten::add": "elementwise (mul, add, div, where)",
    "aten::add_": "elementwise (mul, add, div, where)",
    "aten::div_": "elementwise (mul, add, div, where)",
    "aten::where": "elementwise (mul, add, div, where)",
    "aten::_softmax": "softmax",
    "aten::_softmax_backward_data": "softmax",
    "aten::gelu": "activation",
    "aten::gelu_backward": "activation",
    "aten::silu": "activation",
    "aten::silu_backward": "activation",
    "aten::native_layer_norm": "layer norm",
    "aten::native_layer_norm_backward": "layer norm",
    "aten::copy_": "copies (copy_, cat, clone)",
    "aten::cat": "copies (copy_, cat, clone)",
    "aten::clone": "copies (copy_, cat, clone)",
    "aten::_fused_adamw_": "optimizer",
    "aten::_foreach_mul_": "optimizer",
    "aten::_foreach_add_": "optimizer",
    "aten::_foreach_addcmul_": "optimizer",
    "aten::_foreach_addcdiv_": "optimizer",
    "aten::_foreach_lerp_": "optimizer",
    "aten::_foreach_sqrt": "optimizer",
    "aten::_foreach_div_": "optimizer",
}


def step_gemms(config, batch: int, seq: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """(count, batch of the product, m, n, inner) of every matmul in one FL step; 2 * count * b * m * n * inner
    summed over the list equals ``flops.fl_step_flops``."""
    d, d_kv, d_ff, gated = shapes(config)
    n, layers, heads = batch * seq, config.num_hidden_layers, config.num_attention_heads
    head_dim = d // heads
    frozen = [(d, d), (d_kv, d), (d_kv, d), (d, d), (d_ff, d), (d, d_ff)] + ([(d_ff, d)] if gated else [])
    units_in = [(k, d)] * (2 if gated else 1)  # U1 (and V1): (out, in)
    gemms = []
    for out_f, in_f in frozen:
        gemms += [(layers, 1, n, out_f, in_f), (layers - 1, 1, n, in_f, out_f)]  # forward, input grad
    for out_f, in_f in [*units_in, (d, k)]:
        gemms += [(layers, 1, n, out_f, in_f), (layers, 1, out_f, in_f, n)]  # forward, weight grad
    gemms += [(layers - 1, 1, n, d, k) for _ in units_in]  # U1's input grad (skipped in layer 0)
    gemms += [(layers, 1, n, k, d)]  # U2's input grad
    bh = batch * heads
    gemms += [(layers, bh, seq, seq, head_dim), (layers, bh, seq, head_dim, seq)]  # Q K^T, P V
    gemms += [(2 * (layers - 1), bh, seq, seq, head_dim), (2 * (layers - 1), bh, seq, head_dim, seq)]  # their grads
    return gemms


def gemm_runner(gemms: list[tuple[int, int, int, int, int]]):
    tensors = []
    for count, b, m, n, inner in gemms:
        shape_a, shape_b = ((b, m, inner), (b, inner, n)) if b > 1 else ((m, inner), (inner, n))
        tensors.append((count, torch.randn(shape_a), torch.randn(shape_b), torch.bmm if b > 1 else torch.mm))

    def run() -> float:
        start = time.perf_counter()
        for count, a, b, op in tensors:
            for _ in range(count):
                op(a, b)
        return time.perf_counter() - start

    return run


def square_runner(size: int):
    a, b = torch.randn(size, size), torch.randn(size, size)

    def run() -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        return time.perf_counter() - start

    return run


def profile_step(step: harness.TrainStep) -> dict[str, float]:
    """Seconds of self CPU time per kind of op over one step (the profiler's own overhead included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        kind = OP_KINDS.get(event.key, "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5-small")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, one round")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-units", type=int, default=160)
    parser.add_argument("--square", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    tiny = {"batch": 2, "seq": 16, "num_units": 8, "square": 256, "rounds": 1}
    args, out = harness.parse_args(parser, argv, "ceiling", tiny)

    model, _ = harness.build_variant("fl", harness.load_backbone(args.model), args.num_units)
    config = model.config
    step = harness.TrainStep(model, harness.make_batch(config, args.batch, args.seq))
    gemms = step_gemms(config, args.batch, args.seq, args.num_units)
    flops = fl_step_flops(config, args.batch, args.seq, args.num_units)
    assert flops == sum(2 * c * b * m * n * i for c, b, m, n, i in gemms), "step_gemms disagrees with flops.py"
    runners = {"fl_step": step, "same_gemms": gemm_runner(gemms), "square": square_runner(args.square)}
    samples = harness.time_interleaved(runners, args.rounds, args.max_wait)
    work = {"fl_step": flops, "same_gemms": flops, "square": 2 * args.square**3}
    rows = []
    for name, fn_samples in samples.items():
        row = {"name": name, "gflop": round(work[name] / 1e9, 3)} | harness.summary(fn_samples)
        row["gflops_per_s"] = round(work[name] / row["median_s"] / 1e9, 1)
        rows.append(row)
        print(f"{name:11s} {row['gflop']:9.2f} GFLOP  {row['median_s']:8.4f} s  {row['gflops_per_s']:7.1f} GFLOP/s")
    fraction = harness.paired_ratio(samples["same_gemms"], samples["fl_step"])
    print(f"the step runs at {fraction:.1%} of the speed of its own matmuls alone")
    breakdown = profile_step(step)
    total = sum(breakdown.values())
    for kind, seconds in breakdown.items():
        print(f"  {kind:36s} {seconds:7.3f} s  {seconds / total:6.1%}")
    result = {"benchmark": "ceiling", "model": args.model, "batch": args.batch, "seq": args.seq}
    result |= {"num_units": args.num_units, "rows": rows, "gemm_fraction_of_step": round(fraction, 3)}
    result |= {"profile_s": {k: round(v, 4) for k, v in breakdown.items()}, "machine": harness.machine()}
    harness.save(result, out)
    return result


if __name__ == "__main__":
    main()
