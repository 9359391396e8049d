"""The model of a run: pretrained backbone + tuning method + task head, and the report of what trains.

method = method_for(config.method, backbone_config)        # budget matching happens here
model, method, tokenizer = build_model(config.model, config.method, task)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from fltuning.methods.base import MethodError, TuningMethod, build_method, method_class
from fltuning.methods.budget import count_on_meta
from fltuning.models import resolve_model
from fltuning.tasks.base import Task
from fltuning.tasks.model import TaskModel
from fltuning.train.config import MethodArgs, ModelArgs, RunConfigError


def parse_budget(budget: str | int, config: PretrainedConfig) -> int:
    """``budget`` as a parameter count: an int, or ``"fl:K"`` for FL-tuning's count with K units on ``config``."""
    if isinstance(budget, int):
        return budget
    text = str(budget).strip()
    if text.isdigit():
        return int(text)
    name, _, size = text.partition(":")
    if name == "fl" and size.isdigit():
        return count_on_meta(config, build_method("fl", num_units=int(size)))
    raise RunConfigError(f"--method.budget: expected a parameter count or 'fl:K' (e.g. fl:160), got {budget!r}")


def method_for(args: MethodArgs, config: PretrainedConfig) -> TuningMethod:
    """The method ``args`` names, sized to ``args.budget`` when one is given. Raises ``RunConfigError`` for an
    unknown method or setting."""
    try:
        if args.budget is None:
            return build_method(args.name, **args.settings)
        return method_class(args.name).for_budget(config, parse_budget(args.budget, config), **args.settings)
    except (MethodError, TypeError) as err:
        raise RunConfigError(f"--method: {err}") from err


def load_backbone(args: ModelArgs) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """The pretrained model (no task head) and its tokenizer, from a registry name, a folder or a hub id."""
    path = str(resolve_model(args.name))
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path)
    return backbone, tokenizer, path


def backbone_config(args: ModelArgs) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(resolve_model(args.name)))


def build_model(
    model_args: ModelArgs, method_args: MethodArgs, task: Task
) -> tuple[TaskModel, TuningMethod, PreTrainedTokenizerBase]:
    """Backbone -> ``method.apply`` -> ``TaskModel`` with the task's head. Seed the RNG first: the method's and the
    head's initial weights are drawn here."""
    backbone, tokenizer, _ = load_backbone(model_args)
    method = method_for(method_args, backbone.config)
    model = TaskModel.for_task(task, method.apply(backbone), model_args.pooling)
    return model, method, tokenizer


def fingerprint(config: PretrainedConfig) -> dict[str, Any]:
    """The shape facts an adapter depends on; an adapter is refused by a model whose fingerprint differs."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return {key: getattr(config, key, None) for key in keys}


@dataclass
class ParameterReport:
    method: str
    method_trainable: int
    head_trainable: int
    backbone_total: int  # the pretrained model's own parameters
    backbone_layers: int  # of those, the ones outside the embeddings (the Transformer layers)

    @property
    def trainable(self) -> int:
        return self.method_trainable + self.head_trainable

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_trainable": self.method_trainable,
            "head_trainable": self.head_trainable,
            "trainable": self.trainable,
            "backbone_total": self.backbone_total,
            "backbone_layers": self.backbone_layers,
            "method_percent_of_model": 100.0 * self.method_trainable / self.backbone_total,
            # full fine-tuning also trains the embeddings: all of the layers, not more than all
            "method_percent_of_layers": 100.0
            if self.method == "finetune"
            else 100.0 * self.method_trainable / max(1, self.backbone_layers),
        }

    def __str__(self) -> str:
        d = self.to_dict()
        return (
            f"{self.method}: {self.method_trainable:,} trainable parameters "
            f"({d['method_percent_of_model']:.2f}% of the model's {self.backbone_total:,}, "
            f"{d['method_percent_of_layers']:.2f}% of its {self.backbone_layers:,} outside the embeddings) "
            f"+ {self.head_trainable:,} in the task head"
        )


def parameter_report(model: TaskModel, method: TuningMethod) -> ParameterReport:
    """Counts for the run folder. The model's own parameters are the frozen ones (full fine-tuning: all of them);
    "embeddings" are parameters whose name contains ``embed``."""
    method_count = method.num_trainable(model.backbone)
    own = [(n, p) for n, p in model.backbone.named_parameters() if method.name == "finetune" or not p.requires_grad]
    total = sum(p.numel() for _, p in own)
    layers = sum(p.numel() for n, p in own if "embed" not in n)
    head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    return ParameterReport(method.name, method_count, head, total, layers)
