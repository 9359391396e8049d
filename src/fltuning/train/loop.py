"""The training loop, on Hugging Face Accelerate: the same code runs alone, or under ``torchrun`` /
``accelerate launch`` with one process per device (DDP; gloo on CPU).

Recipe (the paper's code, digest §5.1): AdamW with eps 1e-7 and decoupled weight decay 0.01 except on biases and
norm weights, learning rate decayed linearly to 0 with no warm-up, a fresh random order each epoch, evaluation on
dev at the end of every epoch (or every ``eval_every`` steps), the best dev score (strictly better) kept.

Exact resume: the data order of epoch e is a function of (seed, e) alone, a checkpoint records how many micro-batches
of the epoch are done, and it holds the optimizer, scheduler and every process's RNG state; so a run stopped and
resumed from any checkpoint ends with the same weights as one that never stopped.

Each process reads its own slice of every batch of indices (rank::world), padded by wrapping so that all processes
take the same number of steps; ``train.batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fltuning.methods.base import TuningMethod
from fltuning.tasks.base import Batch, Task
from fltuning.tasks.model import TaskModel
from fltuning.train import checkpoint as ckpt
from fltuning.train.config import RunConfig

METRICS = "metrics.jsonl"


class TrainingStopped(Exception):
    """Training stopped on request (SIGINT / SIGTERM) after saving a checkpoint; ``--output.resume auto``
    continues it."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; nothing was saved over the last good checkpoint."""


@dataclass
class Position:
    """Where training is; saved in every checkpoint's ``state.json``."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches done in the current epoch
    step: int = 0  # optimizer steps done
    best_score: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    evals: int = 0  # evaluations done (older checkpoints lack it: 0)
    train_seconds: float = 0.0


def no_decay(name: str) -> bool:
    """Biases and norm weights get no weight decay (the paper's code: names containing 'bias' or 'Norm')."""
    return "bias" in name or "norm" in name.lower()


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, eps: float, head_lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norms (``no_decay``). With
    ``head_lr``, the task head (``TaskModel.head``: parameters named ``head.*``) gets groups of its own at that LR;
    without, the two groups are those of every earlier checkpoint (resuming needs the same groups)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    parts = [(named, lr)]
    if head_lr is not None:
        parts = [([(n, p) for n, p in named if not n.startswith("head.")], lr)]
        parts.append(([(n, p) for n, p in named if n.startswith("head.")], head_lr))
    groups = [
        {"params": [p for n, p in part if no_decay(n) == skip], "weight_decay": 0.0 if skip else weight_decay}
        | ({} if head_lr is None else {"lr": part_lr})
        for part, part_lr in parts
        for skip in (False, True)
    ]
    return torch.optim.AdamW(groups, lr=lr, eps=eps)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's micro-batches of feature indices for ``epoch``: a permutation drawn from (seed, epoch)
    only, padded by wrapping to a multiple of ``world``, every ``world``-th index from ``rank``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_rank = math.ceil(n / world)
    order += order[: per_rank * world - n]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        {k: v.to(device) for k, v in batch.inputs.items()}, {k: v.to(device) for k, v in batch.targets.items()}
    )


def feature_length(feature: dict) -> int:
    ids = feature["input_ids"]
    return sum(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


@torch.no_grad()
def predict(
    model: TaskModel,
    task: Task,
    features: list[dict],
    batch_size: int,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> list[Any]:
    """``task.decode`` output for every feature, in order. Features are batched by length (less padding); each
    process predicts its share and the shares are gathered."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    order = sorted(range(len(features)), key=lambda i: feature_length(features[i]))[rank::world]
    was_training = model.training
    model.eval()
    mine = []
    chunks = range(0, len(order), batch_size)
    for start in tqdm(chunks, desc="evaluate", disable=not progress or rank != 0, leave=False):
        indices = order[start : start + batch_size]
        batch = to_device(task.collate([features[i] for i in indices]), next(model.parameters()).device)
        mine.extend(zip(indices, task.decode(model(**batch.inputs), batch), strict=True))
    model.train(was_training)
    pairs = gather_object(mine) if world > 1 else mine
    out: list[Any] = [None] * len(features)
    for index, prediction in pairs:
        out[index] = prediction
    return out


class Trainer:
    """Trains ``model`` (a ``TaskModel`` whose backbone ``method.apply`` returned) on encoded features.

    ``callback(event, trainer)`` is called on "step" (after every optimizer step) and "evaluate" (after every
    evaluation, with ``trainer.last_metrics`` set); ``request_stop()`` makes training save and stop at the next
    step, as SIGINT / SIGTERM do."""

    def __init__(
        self,
        config: RunConfig,
        task: Task,
        model: TaskModel,
        method: TuningMethod,
        features: dict[str, list[dict]],
        dev_examples: list,
        run_dir: Path,
        accelerator: Accelerator,
        callback: Callable[[str, Trainer], None] | None = None,
    ):
        self.config, self.task, self.method = config, task, method
        self.features, self.dev_examples = features, dev_examples
        self.run_dir, self.accelerator, self.callback = run_dir, accelerator, callback
        train = config.train
        self.metric = train.metric or task.metric
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.batches_per_epoch = len(epoch_batches(len(features["train"]), train.batch_size, 0, 0, 0, self.world))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / train.grad_accum)
        self.total_steps = self.steps_per_epoch * train.epochs
        optimizer = build_optimizer(model, train.lr, train.weight_decay, train.adam_eps, train.head_lr)
        self.scheduler = get_linear_schedule_with_warmup(
            optimizer, round(train.warmup_ratio * self.total_steps), self.total_steps
        )
        self.model = accelerator.prepare_model(model)
        self.inner: TaskModel = accelerator.unwrap_model(self.model)
        self.optimizer = optimizer
        self.position = Position()
        self.last_metrics: dict[str, float] = {}
        self._stop = False
        self._writer = None

    # -- state ----------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop = True

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        method = {f"method.{k}": v for k, v in self.method.trainable_state_dict(self.inner.backbone).items()}
        head = {f"head.{k}": v for k, v in self.inner.head.state_dict().items()}
        return method | head

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        method = {k[len("method.") :]: v for k, v in tensors.items() if k.startswith("method.")}
        head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        self.method.load_trainable_state_dict(self.inner.backbone, method)
        self.inner.head.load_state_dict(head)

    def save_checkpoint(self, resumable: bool = True) -> Path:
        """Write ``checkpoints/step-N`` atomically (every process writes its RNG state; the main one the rest).
        Not ``resumable``: the trained tensors and position alone (a best-only checkpoint)."""
        final = self.run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(self.position.step)
        tmp = ckpt.temporary_folder(final)
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if resumable:
            ckpt.rng_to_file(tmp, self.rank)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:

            def write(folder: Path) -> None:
                ckpt.save_tensors(self.trained_tensors(), folder / "model.safetensors")
                if resumable:
                    ckpt.optimizer_to_files(self.optimizer, folder)
                state = {"position": asdict(self.position), "scheduler": self.scheduler.state_dict()}
                (folder / "state.json").write_text(json.dumps(state, indent=1) + "\n")

            ckpt.write_atomically(final, write, prepared=True)
            protect = {self.position.best_step} if self.position.best_step is not None else set()
            ckpt.rotate(self.run_dir, self.config.output.keep_checkpoints, protect | {self.position.step})
        self.accelerator.wait_for_everyone()
        return final

    def resume_from(self, folder: Path) -> None:
        self.load_trained_tensors(ckpt.load_tensors(folder / "model.safetensors"))
        ckpt.optimizer_from_files(self.optimizer, folder)
        state = ckpt.read_state(folder)
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
        ckpt.rng_from_file(folder, self.rank)
        if self.accelerator.is_main_process:
            _truncate_metrics(self.run_dir / METRICS, self.position.step)

    # -- logging --------------------------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.config.output.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    # -- training -------------------------------------------------------------------------------------------------

    def evaluate_dev(self) -> dict[str, float]:
        batch_size = self.config.train.eval_batch_size or 2 * self.config.train.batch_size
        predictions = predict(
            self.inner, self.task, self.features["dev"], batch_size, self.accelerator, self.config.output.progress
        )
        return self.task.score(self.dev_examples, self.features["dev"], predictions)

    def _evaluate_and_save(self, started: float) -> None:
        metrics = self.evaluate_dev()
        if self.metric not in metrics:
            raise ValueError(f"--train.metric: task {self.task.kind} reports {sorted(metrics)}, not {self.metric!r}")
        p = self.position
        score = metrics[self.metric]
        improved = p.best_score is None or score > p.best_score
        if improved:
            p.best_score, p.best_step, p.evals_since_best = score, p.step, 0
        else:
            p.evals_since_best += 1
        p.evals += 1
        p.train_seconds += time.perf_counter() - started
        self.last_metrics = metrics
        self.log({"split": "dev", "step": p.step, "epoch": p.epoch, "seconds": round(p.train_seconds, 3)} | metrics)
        if p.evals % self.config.output.checkpoint_every == 0:
            self.save_checkpoint()
        elif improved:
            self.save_checkpoint(resumable=False)
        if self.callback:
            self.callback("evaluate", self)

    def _check_finite(self, value: torch.Tensor, what: str, indices: list[int]) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
        if self.world > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() == 0:
            return
        p = self.position
        if self.accelerator.is_main_process:
            where = {"what": what, "step": p.step, "epoch": p.epoch, "batch": p.batch, "feature_indices": indices}
            where["lr"] = self.scheduler.get_last_lr()[0]
            (self.run_dir / "diverged.json").write_text(json.dumps(where, indent=1) + "\n")
        last = ckpt.list_checkpoints(self.run_dir, resumable=True)
        kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(
            f"{what} became non-finite at step {p.step + 1} (epoch {p.epoch + 1}); {kept}; details in "
            f"{self.run_dir / 'diverged.json'}. Try a lower --train.lr or --train.max_grad_norm 1.0"
        )

    def fit(self) -> Position:
        """Train to the end (or ``max_steps`` / ``patience``); returns the final position (best step and score)."""
        train, p = self.config.train, self.position
        features = self.features["train"]
        trainable = [q for q in self.model.parameters() if q.requires_grad]
        max_steps = min(train.max_steps or self.total_steps, self.total_steps)
        handlers = _install_stop_handlers(self.request_stop)
        bar = tqdm(
            total=max_steps,
            initial=p.step,
            desc="train",
            disable=not self.config.output.progress or not self.accelerator.is_main_process,
        )
        started, running, done = time.perf_counter(), 0.0, p.step >= max_steps
        self.model.train()
        try:
            while not done and p.epoch < train.epochs:
                batches = epoch_batches(len(features), train.batch_size, train.seed, p.epoch, self.rank, self.world)
                for b in range(p.batch, len(batches)):
                    group_start = (b // train.grad_accum) * train.grad_accum
                    group = min(train.grad_accum, len(batches) - group_start)
                    boundary = b + 1 == group_start + group
                    batch = to_device(self.task.collate([features[i] for i in batches[b]]), self.accelerator.device)
                    sync = contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)
                    with sync:
                        loss = self.task.loss(self.model(**batch.inputs), batch)
                        self._check_finite(loss.detach(), "the training loss", batches[b])
                        self.accelerator.backward(loss / group)
                    running += loss.item() / group
                    if not boundary:
                        continue
                    norm = torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm or math.inf)
                    self._check_finite(norm, "the gradient norm", batches[b])
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    p.step, p.batch = p.step + 1, b + 1
                    end_of_epoch = p.batch == len(batches)
                    if end_of_epoch:
                        p.epoch, p.batch = p.epoch + 1, 0
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}", epoch=p.epoch + (0 if end_of_epoch else 1))
                    if p.step % train.log_every == 0:
                        lr = self.scheduler.get_last_lr()[0]
                        self.log({"split": "train", "step": p.step, "epoch": p.epoch, "loss": running, "lr": lr})
                    running = 0.0
                    if self.callback:
                        self.callback("step", self)
                    last = p.step >= max_steps or (end_of_epoch and p.epoch >= train.epochs)
                    due = p.step % train.eval_every == 0 if train.eval_every else end_of_epoch
                    if due or last:
                        self._evaluate_and_save(started)
                        started = time.perf_counter()
                        patience_out = train.patience is not None and p.evals_since_best >= train.patience
                        done = last or patience_out
                    if done:
                        break
                    if self._stop_requested():
                        p.train_seconds += time.perf_counter() - started
                        self.save_checkpoint()
                        raise TrainingStopped(
                            f"stopped at step {p.step}; continue with --output.dir {self.run_dir} --output.resume auto"
                        )
        finally:
            bar.close()
            _restore_handlers(handlers)
            if self._writer is not None:
                self._writer.close()
        return p

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "sum")
        return flag.item() > 0


def _install_stop_handlers(stop: Callable[[], None]) -> dict:
    """SIGINT / SIGTERM ask training to save and stop at the next step (a second SIGINT interrupts at once)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def handler(signum, frame):
        stop()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by the run that stopped (they are recomputed on resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
