"""Training-step time and peak memory of every tuning method at FL-tuning's trainable budget.

FL-tuning with k units (160, the paper's), P-tuning v2 and LoRA sized to the same trainable count, prompt tuning
(its budget-matched size capped at 100 virtual tokens) and full fine-tuning, over sequence lengths and batch sizes.
At the ``--extra-configs`` shapes two more variants run beside them: ``fl_widened`` (FL through the generic widened
path instead of the side branch, fltuning.layers) and ``lora_nodrop`` (LoRA without its 0.1 input dropout).
A step, the interleaved timing and the memory measurement are described in harness.py.

    python benchmarks/speed/train_step.py                          # e5-small, seq 64..512 x batch 16, 32 (~30 min)
    python benchmarks/speed/train_step.py --model minilm-l6 --seqs 128 --batches 16
    python benchmarks/speed/train_step.py --tiny                   # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import harness


def parse_shape(text: str) -> tuple[int, int]:
    batch, seq = text.lower().split("x")
    return int(batch), int(seq)


def variants_for(args: argparse.Namespace, batch: int, seq: int, max_positions: int) -> list[str]:
    names = list(args.variants)
    if (batch, seq) in args.extra_configs:
        names += [v for v in args.extra_variants if v not in names]
    if seq + args.prompt_tokens > max_positions:  # the virtual tokens take positions too
        names = [v for v in names if v != "prompt_tuning"]
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5-small")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, short shapes, one round")
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--variants", nargs="+", default=["finetune", "fl", "ptuning_v2", "lora", "prompt_tuning"])
    parser.add_argument("--extra-variants", nargs="+", default=["fl_widened", "lora_nodrop"])
    parser.add_argument("--extra-configs", type=parse_shape, nargs="*", default=[(16, 128)], metavar="BxT")
    parser.add_argument("--num-units", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rounds-large", type=int, default=2, help="rounds for shapes of more than 4096 tokens")
    parser.add_argument("--memory-variants", nargs="*", help="variants whose peak memory is measured (default: all)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True, help="a process per shape")
    parser.add_argument("--time-shape", type=int, nargs=2, metavar=("BATCH", "SEQ"), help=argparse.SUPPRESS)
    tiny = {"seqs": [16], "batches": [2], "rounds": 1, "rounds_large": 1}
    tiny |= {"extra_configs": [(2, 16)], "num_units": 8, "isolate": False}
    args, out = harness.parse_args(parser, argv, "train_step", tiny)
    if args.tiny:
        args.memory_variants = args.memory_variants or ["fl"]  # a subprocess each (~5 s of imports): keep it short
    args.prompt_tokens = 100  # PromptTuning's budget cap
    if args.time_shape:  # the child of an isolated run: time one shape, print the rows as JSON
        harness.first_to_go_when_out_of_memory()
        print(json.dumps(time_shape(args, args.variants, *args.time_shape)))
        return {}

    config = harness.load_config(args.model)
    rows = []
    for batch in args.batches:
        for seq in args.seqs:
            names = variants_for(args, batch, seq, config.max_position_embeddings)
            if args.isolate:  # a fresh process per shape: a shape that does not fit in memory loses only itself
                cmd = [sys.executable, __file__, *child_args(args, names), "--time-shape", str(batch), str(seq)]
                try:
                    shape_rows = harness.run_child(cmd)
                except harness.ChildFailed as err:
                    shape_rows = [{"batch": batch, "seq": seq, "variant": n, "error": str(err)} for n in names]
            else:
                shape_rows = time_shape(args, names, batch, seq)
            for row in shape_rows:
                if "error" not in row and (args.memory_variants is None or row["variant"] in args.memory_variants):
                    spec = {"model": args.model, "variant": row["variant"], "batch": batch, "seq": seq}
                    row |= harness.peak_memory(spec | {"num_units": args.num_units}, args.threads)
                rows.append(row)
                print(_line(row), flush=True)
    result = {"benchmark": "train_step", "model": args.model, "num_units": args.num_units, "rows": rows}
    result |= {"ratios": ratios(rows), "machine": harness.machine(), "rounds": [args.rounds, args.rounds_large]}
    harness.save(result, out)
    return result


def time_shape(args: argparse.Namespace, names: list[str], batch: int, seq: int) -> list[dict]:
    """Build ``names`` on the model and time their steps at ``batch x seq``, interleaved; one row per variant."""
    backbone = harness.load_backbone(args.model)
    built = {v: harness.build_variant(v, copy.deepcopy(backbone), args.num_units) for v in names}
    del backbone
    batch_inputs = harness.make_batch(built[names[0]][0].config, batch, seq)
    steps = {v: harness.TrainStep(model, batch_inputs) for v, (model, _) in built.items()}
    rounds = args.rounds_large if batch * seq > 4096 else args.rounds
    samples = harness.time_interleaved(steps, rounds, args.max_wait)
    rows = []
    for name, (model, method) in built.items():
        row = {"batch": batch, "seq": seq, "variant": name, "method": method.name}
        row |= {"settings": method.settings(), "trainable": _trainable(model)}
        rows.append(row | harness.summary(samples[name]))
    return rows


def child_args(args: argparse.Namespace, names: list[str]) -> list[str]:
    """The command-line arguments that make a child process time ``names`` as this run would."""
    return [
        *("--model", args.model, "--num-units", str(args.num_units), "--threads", str(args.threads)),
        *("--rounds", str(args.rounds), "--rounds-large", str(args.rounds_large), "--max-wait", str(args.max_wait)),
        *("--variants", *names),
    ]


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['batch']:3d} x {row['seq']:4d}  {row['variant']:14s} not timed: {row['error']}"
    memory = f"  peak {row['peak_mb']:8.0f} MiB (loaded {row['loaded_mb']:6.0f})" if "peak_mb" in row else ""
    memory = f"  memory: {row['memory_error']}" if "memory_error" in row else memory
    return (
        f"{row['batch']:3d} x {row['seq']:4d}  {row['variant']:14s} trainable {row['trainable']:>12,}  "
        f"{row['median_s']:7.3f} s (min {row['min_s']:.3f}){memory}"
    )


def ratios(rows: list[dict]) -> list[dict]:
    """Per shape: FL's step time (wall and CPU seconds, paired by round) and peak memory over each other variant's."""
    out = []
    for batch, seq in dict.fromkeys((r["batch"], r["seq"]) for r in rows):
        at = {r["variant"]: r for r in rows if (r["batch"], r["seq"]) == (batch, seq) and "error" not in r}
        if "fl" not in at:
            continue
        fl = at["fl"]
        entry = {"batch": batch, "seq": seq}
        for name, row in at.items():
            if name == "fl":
                continue
            entry[f"time_fl_over_{name}"] = round(harness.paired_ratio(fl["samples"], row["samples"]), 3)
            entry[f"cputime_fl_over_{name}"] = round(harness.paired_ratio(fl["samples"], row["samples"], 1), 3)
            if "peak_mb" in fl and "peak_mb" in row:
                entry[f"memory_fl_over_{name}"] = round(fl["peak_mb"] / row["peak_mb"], 3)
        out.append(entry)
    return out


if __name__ == "__main__":
    main()
