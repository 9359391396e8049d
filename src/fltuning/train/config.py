"""The run configuration: five typed sections, read from YAML, overridden by dotted flags, checked strictly.

    fltune train --config configs/fewclue/eprstmt.yaml --train.lr 3e-4 --method.num_units 64

A YAML file holds the sections ``model``, ``method``, ``data``, ``train`` and ``output``; every key is optional
(defaults below). A flag ``--section.key value`` overrides one key; its value is read as YAML (``3e-4``, ``true``,
``[0, 1]``, ``null``). A key no section has, or a value of the wrong type, is a ``RunConfigError`` naming it.

``method`` is the one open section: besides ``name`` and ``budget`` it takes the chosen method's own settings
(``num_units`` for ``fl``, ``num_prompts`` for ``ptuning_v2``, ``r`` for ``lora`` ...), checked against that method.
``data.task_settings`` likewise goes to the task's constructor (``text_field`` ... for ``custom``).
"""

from __future__ import annotations

import dataclasses
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RunConfigError(ValueError):
    """A bad configuration key or value; the message names the key (as its ``--section.key`` flag) or the file."""


@dataclass
class ModelArgs:
    name: str = "e5-small"
    """a registry name (`fltune models list`), a local transformers folder, or a Hugging Face hub id"""
    pooling: str | None = None
    """cls | last | mean: the vector a pooled head reads (default: last for decoder LMs, else cls)"""


@dataclass
class MethodArgs:
    name: str = "fl"
    """fl | ptuning_v2 | prompt_tuning | lora | finetune; the method's own settings are further keys here"""
    budget: str | int | None = None
    """match the trainable count to N parameters, or to 'fl:K' (FL-tuning with K units on this model)"""
    settings: dict[str, Any] = field(default_factory=dict)
    """the method's settings (in YAML and flags written as method.<setting>, e.g. --method.num_units 160)"""


@dataclass
class DataArgs:
    task: str = "fewclue/eprstmt"
    """a task name (`fltune tasks`), or custom with data.train_file etc."""
    split: str | int | None = None
    """FewCLUE 0-4 or all; OCNLI 50k/30k/10k/3k; CMRC2018 train/trial (default: the task's own)"""
    data_dir: str | None = None
    """where the CLUE/FewCLUE folders are (default: $FLTUNING_DATA_DIR)"""
    train_file: str | None = None
    """read training examples from this file instead of the task's layout"""
    dev_file: str | None = None
    """read dev examples from this file instead of the task's layout"""
    test_file: str | None = None
    """read test examples from this file instead of the task's layout"""
    task_settings: dict[str, Any] = field(default_factory=dict)
    """task constructor settings, e.g. {text_field: review, label_field: stars} for custom"""
    max_length: int | None = None
    """tokens per sequence (default: the paper's value for the task)"""
    max_train_examples: int | None = None
    """train on a random subset of this size (drawn with data.sample_seed, file order kept)"""
    max_dev_examples: int | None = None
    """evaluate on a random subset of the dev set of this size"""
    max_test_examples: int | None = None
    """predict a random subset of the test set of this size"""
    sample_seed: int = 0
    """seed of the subsets above"""


@dataclass
class TrainArgs:
    epochs: int = 10
    """passes over the training set"""
    batch_size: int = 32
    """examples per micro-batch, per process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 5e-4
    """peak learning rate (linear decay to 0 over the run)"""
    head_lr: float | None = None
    """peak learning rate of the task head (default: train.lr); e.g. full fine-tuning at 3e-5 with a new
    GlobalPointer head that would learn too slowly at the backbone's rate"""
    warmup_ratio: float = 0.0
    """fraction of the steps with a linear warm-up (the paper: none)"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; never on biases and norm weights"""
    adam_eps: float = 1e-7
    """Adam epsilon (Keras' 1e-7, as in the paper's code)"""
    max_grad_norm: float | None = None
    """clip the gradient norm to this (the paper: no clipping)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (the schedule still spans train.epochs)"""
    eval_every: int = 0
    """evaluate on dev every N optimizer steps; 0: at the end of every epoch"""
    eval_batch_size: int | None = None
    """examples per evaluation batch (default: 2 x train.batch_size)"""
    patience: int | None = None
    """stop after this many evaluations without a better dev score (default: never)"""
    metric: str | None = None
    """the dev metric that selects the best checkpoint (default: the task's own, e.g. accuracy, f1)"""
    seed: int = 42
    """seed of the weight init, data order and dropout"""
    log_every: int = 10
    """write the training loss to metrics.jsonl every N optimizer steps"""


@dataclass
class OutputArgs:
    dir: str | None = None
    """the run folder (default: runs/<task>/<method>-seed<seed>)"""
    resume: str = "never"
    """never | auto (continue from the newest complete checkpoint in the run folder, if any)"""
    keep_checkpoints: int = 1
    """newest checkpoints kept besides the best one"""
    checkpoint_every: int = 1
    """write a resumable checkpoint (with the optimizer state) at every N-th evaluation and on a stop; at the
    others a new best dev score saves the trained tensors alone. Above 1 it saves time when much trains (full
    fine-tuning of e5-small: 1.4 GB per checkpoint); a crash then loses up to N evaluations of progress"""
    predict: bool = True
    """write the test-set submission file at the end"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the tensorboard package)"""
    progress: bool = True
    """show a progress bar"""


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "method": MethodArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "output": OutputArgs,
}
OPEN_SECTIONS = {"method": "settings"}  # unknown keys of these sections go to the named dict field
CHOICES = {
    ("model", "pooling"): ("cls", "last", "mean", None),
    ("output", "resume"): ("never", "auto"),
}
POSITIVE = {("train", k) for k in ("epochs", "batch_size", "grad_accum", "log_every")} | {
    ("train", "eval_batch_size"),
    ("train", "max_steps"),
    ("train", "patience"),
    ("data", "max_length"),
    ("data", "max_train_examples"),
    ("data", "max_dev_examples"),
    ("data", "max_test_examples"),
    ("output", "checkpoint_every"),
}
RATES = {("train", "lr"), ("train", "head_lr")}


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    method: MethodArgs = field(default_factory=MethodArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    output: OutputArgs = field(default_factory=OutputArgs)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dicts; the method's settings are flattened into its section, as written in YAML."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = {k: v for k, v in out["method"].items() if k != "settings"} | dict(self.method.settings)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def run_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        return Path("runs") / self.data.task.replace("/", "-") / f"{self.method.name}-seed{self.train.seed}"


def field_types(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section)


def field_docs(section: type) -> dict[str, str]:
    """The attribute docstrings of a section dataclass (the string right after each field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(section))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())  # one line, however wrapped
    return docs


def type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    return getattr(origin or hint, "__name__", str(hint))


def check_value(flag: str, hint: Any, value: Any) -> Any:
    """``value`` if it has type ``hint`` (an int is accepted as a float); else ``RunConfigError`` naming ``flag``."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is Any:
            return value
        base = typing.get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base in (str, dict, list) and isinstance(value, base):
            return value
    raise RunConfigError(f"--{flag}: expected {type_name(hint)}, got {value!r}")


def parse_flag_value(text: str) -> Any:
    """A flag's text read as YAML (``0`` -> 0, ``true`` -> True, ``null`` -> None, ``[0, 1]`` -> a list); text that
    is not valid YAML stays text. Float fields also accept YAML 1.1's string reading of ``3e-4``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce_float_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set(config: RunConfig, section: str, key: str, value: Any, where: str) -> None:
    if section not in SECTIONS:
        raise RunConfigError(f"{where}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
    args = getattr(config, section)
    hints = field_types(SECTIONS[section])
    head, _, rest = key.partition(".")
    if head not in hints or head in OPEN_SECTIONS.values():
        if section in OPEN_SECTIONS and not rest:
            getattr(args, OPEN_SECTIONS[section])[key] = value
            return
        known = [k for k in hints if k not in OPEN_SECTIONS.values()]
        raise RunConfigError(f"{where}: unknown key {section}.{key}; {section} keys are {', '.join(known)}")
    if rest:  # a key inside a dict field: --data.task_settings.text_field review
        if typing.get_origin(hints[head]) is not dict and hints[head] is not dict:
            raise RunConfigError(f"{where}: {section}.{head} is not a mapping; cannot set {section}.{key}")
        getattr(args, head)[rest] = value
        return
    hint = hints[head]
    if "float" in type_name(hint):
        value = _coerce_float_text(value)
    value = check_value(f"{section}.{head}", hint, value)
    choices = CHOICES.get((section, head))
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise RunConfigError(f"--{section}.{head}: {value!r} is not one of {shown}")
    if (section, head) in POSITIVE and value is not None and value < 1:
        raise RunConfigError(f"--{section}.{head}: must be at least 1, got {value!r}")
    if (section, head) in RATES and value is not None and not value > 0:
        raise RunConfigError(f"--{section}.{head}: a learning rate must be above 0, got {value!r}")
    setattr(args, head, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The defaults, then the YAML file at ``path``, then ``overrides`` ({"train.lr": 3e-4, ...}). An override of
    ``method.name`` naming another method than the file's drops the file's ``method`` section.

    Raises ``RunConfigError`` for a missing or malformed file, an unknown key or a value of the wrong type."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise RunConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            raise RunConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise RunConfigError(f"{path}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise RunConfigError(f"{path}: section {section!r} must be a mapping, got {values!r}")
            for key, value in values.items():
                if section in OPEN_SECTIONS and key == OPEN_SECTIONS[section] and isinstance(value, dict):
                    getattr(config, section).settings.update(value)
                    continue
                _set(config, section, str(key), value, str(path))
    overrides = overrides or {}
    if path is not None and overrides.get("method.name", config.method.name) != config.method.name:
        config.method = MethodArgs()  # the file's method settings belong to the file's method
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key:
            raise RunConfigError(f"--{dotted}: flags are --section.key (e.g. --train.lr 3e-4)")
        _set(config, section, key, value, f"--{dotted}")
    return config


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "3e-4", "--data.split=1"]`` -> ``{"train.lr": 3e-4, "data.split": 1}``.

    Raises ``RunConfigError`` for a token that is not a ``--section.key`` flag or a flag without a value."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise RunConfigError(f"unexpected argument {token!r}; settings are --section.key value (see --help)")
        if "=" in token:
            key, text = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise RunConfigError(f"{token}: missing value")
            key, text = token[2:], args[i + 1]
            i += 2
        overrides[key] = parse_flag_value(text)
    return overrides


def describe() -> str:
    """Every section key with its type, default and meaning, for ``--help``."""
    lines = []
    defaults = RunConfig()
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        docs, hints = field_docs(cls), field_types(cls)
        for name, hint in hints.items():
            if section in OPEN_SECTIONS and name == OPEN_SECTIONS[section]:
                continue
            default = getattr(getattr(defaults, section), name)
            lines.append(f"  --{section}.{name} ({type_name(hint)}, default: {default!r})")
            if name in docs:
                lines.append(textwrap.fill(docs[name], 116, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
