"""What the speed benchmarks share: backbones, the methods at one trainable budget, one training step, interleaved
timing, peak memory in a fresh process, and the machine description.

A training step is what the training code does per batch: ``TaskModel`` (backbone + classification head on the
pooled vector) forward in train mode (dropout on), cross-entropy, backward, ``AdamW.step()``, ``zero_grad``. The
batch is random token ids of exactly ``seq`` tokens, all attended (no padding).

Timing: every variant lives in one process and they run in rounds (a, b, c, a, b, c, ...), so the noise of a shared
2-core machine hits them alike. Ratios are only taken within one run, as the median over rounds of the two variants'
ratio in each round (``paired_ratio``). Other jobs on the machine slow a 2-thread step far beyond their share (an
OpenMP thread that loses its core stalls its partner at every barrier, so ops with many small kernels suffer most).
So before each round the harness waits (up to ``max_wait_s``) until the other processes leave our torch threads
their cores, and every call records its wall seconds, this process's CPU seconds, and ``background``: the CPU time
other processes used while it ran, as a share of the cores (/proc/stat minus this process's CPU time). A call is
clean when ``background`` stayed under the cores our threads do not need plus ``CLEAN`` (with 2 threads on 2 cores:
under 15%; with 1 thread: under 65%). A time is the median over the clean calls (all calls when none is), after
one warm-up call each; ``cpu_median_s`` is the same over CPU seconds, which the stalls inflate less.

Peak memory: the peak resident set size of a fresh subprocess per configuration (``python harness.py --peak-memory
SPEC``), which loads the model, reads every weight once, runs a warm-up step on a 1 x 8 batch (AdamW's state then
exists, as in steady state), resets the kernel's high-water mark (``/proc/self/clear_refs``, so the transient of
loading the checkpoint does not count) and runs one step of the measured shape. Reading every weight makes the whole
checkpoint resident for every method: transformers memory-maps it, and a frozen model would otherwise never page in
the embedding rows its batches do not use (a long run over real data eventually does). ``peak_mb`` is that step's
high-water mark (weights, optimizer state, activations, gradients, allocator slack, the Python runtime: what the
machine must provide); ``loaded_mb`` is the resident size before the first step, so ``peak_mb - loaded_mb`` is what
training adds. Why a process each: torch keeps no CPU allocator statistics, and inside one process memory freed by one
configuration is reused by the next, which would hide part of its peak.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from fltuning.architectures import find_ffn_blocks
from fltuning.layers import FLDown, FLUp
from fltuning.methods.base import TuningMethod, build_method, method_class
from fltuning.methods.budget import count_on_meta
from fltuning.tasks.classification import ClassificationHead
from fltuning.tasks.model import TaskModel, default_pooling
from fltuning.train.run import cpu_model

RESULTS = Path(__file__).parent / "results"
# A round starts once the cores our torch threads do not need are all other processes use, give or take QUIET of
# the cores; a call is clean when that held, give or take CLEAN, while it ran (see free_share).
QUIET = 0.10
CLEAN = 0.15
TINY = "tiny"  # a random 2-layer BERT (hidden 32): the tests' model, seconds per benchmark

# variant -> (method, settings beside the budget-matched size). "frozen" is the k = 0 floor of FL-tuning: nothing in
# the backbone trains, but gradients still flow through every layer down to the first FFN's output, exactly where
# FL-tuning's first units need them.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {}),
    "fl": ("fl", {}),
    "fl_widened": ("fl", {}),  # FL through the generic widened path instead of the side branch
    "ptuning_v2": ("ptuning_v2", {}),
    "lora": ("lora", {}),
    "lora_nodrop": ("lora", {"dropout": 0.0}),
    "prompt_tuning": ("prompt_tuning", {}),
    "frozen": ("finetune", {}),
}


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, benchmark: str, tiny: dict[str, Any]
) -> tuple[argparse.Namespace, Path]:
    """Add the options every speed benchmark shares (``--threads``, ``--max-wait``, ``--out``), parse ``argv`` and
    apply ``--tiny`` (the tiny model, one thread, no waiting for a quiet machine, and the script's own ``tiny``
    sizes); sets torch's threads. Returns the arguments and the result file."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-wait", type=float, default=20.0, help="seconds to wait for a quiet machine per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in {"model": TINY, "threads": 1, "max_wait": 0.0, **tiny}.items():
            setattr(args, key, value)
    set_threads(args.threads)
    return args, args.out or result_path(benchmark, args.model, args.threads)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_backbone(name: str) -> nn.Module:
    """The named offline model (``fltuning.models``), or ``tiny``: a seeded random 2-layer BERT."""
    if name == TINY:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=512,
        )
        return BertModel(config)
    from transformers import AutoModel

    from fltuning.models import resolve_model

    return AutoModel.from_pretrained(resolve_model(name))


def load_config(name: str) -> transformers.PretrainedConfig:
    """The config of ``load_backbone(name)``, without its weights."""
    if name == TINY:
        return load_backbone(TINY).config
    from fltuning.models import resolve_model

    return transformers.AutoConfig.from_pretrained(resolve_model(name))


def fl_budget(config: transformers.PretrainedConfig, num_units: int) -> int:
    """FL-tuning's trainable count with ``num_units`` units: the budget every other method is sized to."""
    return count_on_meta(config, build_method("fl", num_units=num_units))


def build_variant(variant: str, backbone: nn.Module, num_units: int) -> tuple[nn.Module, TuningMethod]:
    """``variant`` applied to ``backbone`` (pass a copy to keep the original), sized to FL's budget at
    ``num_units``; returns the task model in train mode and the method."""
    name, settings = VARIANTS[variant]
    config = backbone.config
    if name in ("fl", "finetune"):
        method = build_method(name, **({"num_units": num_units} if name == "fl" else {}))
    else:
        method = method_class(name).for_budget(config, fl_budget(config, num_units), **settings)
    module = method.apply(backbone)
    if variant == "fl_widened":
        unlink_side_branch(module)
    if variant == "frozen":
        for p in module.parameters():
            p.requires_grad_(False)
        _, blocks = find_ffn_blocks(module)
        first_down = blocks[0].projections["down"][1]
        first_down.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))
    torch.manual_seed(0)
    model = TaskModel(module, ClassificationHead(config.hidden_size, 2), default_pooling(config))
    return model.train(), method


def unlink_side_branch(model: nn.Module) -> None:
    """Make every FL projection of ``model`` use the widened path (``fltuning.layers``)."""
    for module in model.modules():
        if isinstance(module, FLUp | FLDown):
            module.side_branch = None


def make_batch(config: transformers.PretrainedConfig, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))}


class TrainStep:
    """One training step of ``model`` on a fixed batch; calling it returns the seconds the step took."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        self.model, self.batch = model, batch
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)

    def __call__(self) -> float:
        inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(**inputs), self.batch["labels"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat, all cores)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measured(fn: Callable[[], float]) -> tuple[float, float, float]:
    """Call ``fn``: its wall seconds, this process's CPU seconds, and the share of the cores other processes used."""
    busy, own = busy_cpu_s(), time.process_time()
    seconds = fn()
    cpu = time.process_time() - own
    others = busy_cpu_s() - busy - cpu
    return seconds, cpu, max(0.0, others / (seconds * os.cpu_count()))


def free_share(threads: int | None = None) -> float:
    """The share of the cores other processes may use without taking one from our ``threads`` torch threads
    (default: the current setting)."""
    cores = os.cpu_count() or 1
    return max(0, cores - (threads or torch.get_num_threads())) / cores


def wait_for_quiet(max_wait_s: float) -> float:
    """Sleep until the other processes leave our threads their cores (or ``max_wait_s`` passed); the seconds
    waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        if measured(lambda: time.sleep(1.0) or 1.0)[2] < free_share() + QUIET:
            break
    return time.perf_counter() - start


def time_interleaved(
    fns: dict[str, Callable[[], float]], rounds: int, max_wait_s: float = 20.0
) -> dict[str, list[tuple[float, float, float]]]:
    """One warm-up call each, then ``rounds`` rounds calling every function in turn, each round started on a quiet
    machine if one comes within ``max_wait_s``; (wall seconds, CPU seconds, background share) per call."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in fns}
    for _ in range(rounds):
        wait_for_quiet(max_wait_s)
        for name, fn in fns.items():
            samples[name].append(measured(fn))
    return samples


def summary(samples: list, threads: int | None = None) -> dict[str, Any]:
    """Median wall and CPU seconds over the clean calls (all calls if none is clean), the fastest call, how many
    were clean, the median background share, and the raw samples [wall, CPU, background] in round order."""
    clean = [s for s in samples if s[2] < free_share(threads) + CLEAN]
    chosen = clean or samples
    return {
        "median_s": statistics.median(s[0] for s in chosen),
        "cpu_median_s": statistics.median(s[1] for s in chosen),
        "min_s": min(s[0] for s in samples),
        "clean": len(clean),
        "background": round(statistics.median(s[2] for s in samples), 3),
        "samples": [[round(wall, 4), round(cpu, 4), round(share, 3)] for wall, cpu, share in samples],
    }


def paired_ratio(a: list, b: list, index: int = 0) -> float:
    """Median over rounds of ``a``'s time over ``b``'s time in the same round (``index`` 0: wall, 1: CPU seconds).
    Calls of one round ran seconds apart, so a slow drift of the machine (another job starting, the clock
    changing) cancels in each pair instead of landing on one variant."""
    return statistics.median(x[index] / y[index] for x, y in zip(a, b, strict=True))


def resident_mb() -> dict[str, float]:
    """Current and peak resident set size of this process in MiB (Linux ``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


class ChildFailed(RuntimeError):
    """A benchmark child process failed; the message says how (killed by the kernel: out of memory)."""


def run_child(cmd: list[str]) -> Any:
    """Run ``cmd`` (a Python child that prints JSON on its last line) and return that JSON. Raises ``ChildFailed``;
    a child killed by SIGKILL was, on this machine, killed by the kernel for want of memory."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == -9:
        raise ChildFailed("killed by the kernel (out of memory)")
    if done.returncode != 0:
        raise ChildFailed(f"exit code {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory(spec: dict[str, Any], threads: int = 2) -> dict[str, Any]:
    """Run ``spec`` ({model, variant, batch, seq, num_units}) in a fresh process; its loaded and peak RSS in MiB, or
    ``{"memory_error": why}`` when the child failed (e.g. the shape does not fit in memory)."""
    try:
        return run_child([sys.executable, __file__, "--peak-memory", json.dumps(spec), "--threads", str(threads)])
    except ChildFailed as err:
        return {"memory_error": str(err)}


def first_to_go_when_out_of_memory() -> None:
    """Ask the kernel to kill this process first if memory runs out: on a shared machine a benchmark shape that does
    not fit must fail itself, not someone else's job."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def _peak_memory_child(spec: dict[str, Any]) -> dict[str, float]:
    first_to_go_when_out_of_memory()
    model, _ = build_variant(spec["variant"], load_backbone(spec["model"]), spec["num_units"])
    with torch.no_grad():  # read every weight: transformers memory-maps the checkpoint, and pages never read (most
        for tensor in model.state_dict().values():  # embedding rows) would otherwise not count for frozen methods
            tensor.sum()
    gc.collect()
    loaded = resident_mb()["VmRSS"]
    step = TrainStep(model, make_batch(model.config, 1, 8))
    step()  # AdamW's state now exists, as in any later step
    step.batch = make_batch(model.config, spec["batch"], spec["seq"])
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step()
    return {"loaded_mb": round(loaded, 1), "peak_mb": round(resident_mb()["VmHWM"], 1)}


def machine() -> dict[str, Any]:
    """CPU model and cores, torch / transformers / Python versions, threads used."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def result_path(benchmark: str, model: str, threads: int) -> Path:
    """Where a benchmark's JSON goes by default: ``results/<benchmark>_<model>_t<threads>.json``."""
    return RESULTS / f"{benchmark}_{model}_t{threads}.json"


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child process of peak_memory()")
    parser.add_argument("--peak-memory", required=True, help="JSON spec: model, variant, batch, seq, num_units")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    print(json.dumps(_peak_memory_child(json.loads(args.peak_memory))))
