"""`fltune`: the command line.

    fltune train --config configs/fewclue/eprstmt.yaml [--section.key value ...]   # train, evaluate, predict
    fltune train --task fewclue/tnews --split 0 --data-dir ../shared/data           # defaults + shortcuts
    fltune train --print-config --method.name lora                                 # the effective config, as YAML
    fltune evaluate RUN_OR_ADAPTER [--part dev|test]                               # scores of the best model
    fltune predict RUN_OR_ADAPTER [--input FILE] [--output FILE]                   # CLUE submission file
    fltune export RUN_OR_ADAPTER --out DIR [--merged]                              # adapter, or merged checkpoint
    fltune models list | prepare NAME                                              # offline real weights
    fltune tasks                                                                   # the task names

Several processes: `torchrun --nproc_per_node N -m fltuning.cli train ...` or `accelerate launch -m fltuning.cli
train ...` (train.batch_size is per process).

Exit codes: 0 success; 1 training diverged (non-finite loss; the last good checkpoint is kept); 2 bad input (the
message names the flag, file or line to fix; nothing half-done is written); 3 stopped by SIGINT / SIGTERM after
saving a checkpoint (continue with --output.resume auto).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
import time

from fltuning.models import ModelError, list_models, prepare_model

EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_STOPPED = 1, 2, 3


def _models_list(args: argparse.Namespace) -> int:
    for info in list_models():
        state = "prepared" if info.prepared else "not prepared"
        print(f"{info.name:14s} {info.architecture:22s} {state:13s} {info.path}")
        print(f"{'':14s} {info.description} (package {info.package})")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    path = prepare_model(args.name, force=args.force)
    print(f"{args.name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from fltuning.tasks.registry import task_names, task_spec

    for name in task_names():
        spec = task_spec(name)
        where = spec.layout.describe() if spec.layout.parts else "your own files (--data.train_file ...)"
        print(f"{name:16s} max_length {spec.max_length:4d}  {where}")
    return 0


def method_settings_help() -> str:
    """Each method's own settings (``--method.<setting>``), from the method classes' signatures."""
    import dataclasses

    from fltuning.config import FLTuningConfig
    from fltuning.methods.base import method_class, method_names

    lines = ["method settings (--method.<setting>, for the chosen --method.name):"]
    for name in method_names():
        if name == "fl":
            fields = [f for f in dataclasses.fields(FLTuningConfig) if f.init and f.name != "inference_mode"]
            shown = [f"{f.name}={f.default!r}" for f in fields if f.name != "base_model_name_or_path"]
        else:
            params = inspect.signature(method_class(name).__init__).parameters.values()
            named = [p for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
            shown = [f"{p.name}={p.default!r}" for p in named]
        lines.append(f"  {name}: {', '.join(shown) or '(none)'}")
    return "\n".join(lines)


SHORTCUTS = {"data_dir": "data.data_dir", "task": "data.task", "split": "data.split"}


def _overrides(args: argparse.Namespace):
    """The ``--section.key value`` flags, with the shortcuts --data-dir / --task / --split (CLUE users' habit)."""
    from fltuning.train.config import parse_flag_value, parse_overrides

    shortcuts = {
        key: parse_flag_value(str(value))
        for name, key in SHORTCUTS.items()
        if (value := getattr(args, name, None)) is not None
    }
    return shortcuts | parse_overrides(args.overrides)


def _add_shortcuts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the CLUE / FewCLUE data folder, same as --data.data_dir")
    parser.add_argument("--task", help="same as --data.task (see `fltune tasks`)")
    parser.add_argument("--split", help="same as --data.split (FewCLUE: 0-4 or all)")


def _train(args: argparse.Namespace) -> int:
    from fltuning.train.config import load_config
    from fltuning.train.run import train

    config = load_config(args.config, _overrides(args))
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    results = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # one summary from a multi-process run
        return 0
    summary = {k: results[k] for k in ("task", "method", "best_step", "dev", "test") if k in results}
    for split in ("dev", "test"):
        if split in results:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in results[split].items() if k not in ("total", "skip"))
            print(f"{split}: {shown}", file=sys.stderr)
    print(f"run folder: {config.run_dir()}", file=sys.stderr)
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fltuning.train.inference import evaluate

    print(json.dumps({args.part: evaluate(args.path, args.part, _overrides(args))}))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fltuning.train.inference import predict_file

    path = predict_file(args.path, args.input, args.output, args.overwrite, _overrides(args))
    print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from fltuning.train.inference import export

    print(export(args.path, args.out, args.merged, args.model))
    return 0


def build_parser(full_help: bool = True) -> argparse.ArgumentParser:
    """``full_help``: list every config key and method setting under ``train --help`` (imports every method)."""
    from fltuning.train.config import describe

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fltune", description=__doc__, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a task with a tuning method (YAML config + --section.key overrides)",
        description="Train, select the best checkpoint on dev, score it on dev and test, write the submission.",
        epilog=describe() + "\n\n" + method_settings_help() if full_help else None,
        formatter_class=raw,
    )
    train.add_argument("--config", help="a YAML file with sections model, method, data, train, output (default: none)")
    train.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    _add_shortcuts(train)
    train.set_defaults(run=_train, overrides=[])

    evaluate = commands.add_parser("evaluate", help="score a trained model (run or adapter folder)")
    evaluate.add_argument("path", help="a run folder or an adapter folder")
    evaluate.add_argument("--part", choices=("dev", "test"), default="dev", help="the set to score (default: dev)")
    _add_shortcuts(evaluate)
    evaluate.set_defaults(run=_evaluate, overrides=[])

    predict = commands.add_parser("predict", help="write the CLUE submission file for a test set")
    predict.add_argument("path", help="a run folder or an adapter folder")
    predict.add_argument("--input", help="a test file in the task's format (default: the task's test file)")
    predict.add_argument("--output", help="where to write (default: <run>/predictions/<task>_predict.json)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_shortcuts(predict)
    predict.set_defaults(run=_predict, overrides=[])

    export = commands.add_parser("export", help="write the adapter folder, or the merged plain checkpoint")
    export.add_argument("path", help="a run folder or an adapter folder")
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.add_argument("--merged", action="store_true", help="fold the method into a plain transformers model")
    export.add_argument("--model", help="the base model (default: the one the adapter was trained on)")
    export.set_defaults(run=_export, overrides=[])

    commands.add_parser("tasks", help="list the task names and their data layouts").set_defaults(run=_tasks)

    models = commands.add_parser("models", help="real pretrained weights available offline")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list the offline models").set_defaults(run=_models_list)
    prepare = models_commands.add_parser("prepare", help="build a model into the cache (reused afterwards)")
    prepare.add_argument("name", help="a name from `fltune models list`")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared (default: False)")
    prepare.set_defaults(run=_models_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fltuning.methods.base import MethodError
    from fltuning.train.adapter import AdapterMismatchError
    from fltuning.train.checkpoint import CheckpointError
    from fltuning.train.loop import TrainingDiverged, TrainingStopped

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(full_help=any(a in ("-h", "--help") for a in argv))
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.command not in ("train", "evaluate", "predict"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = rest
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()  # e.g. the load report of a task model's unused pooler
    transformers.logging.disable_progress_bar()
    try:
        return args.run(args)
    except TrainingStopped as err:
        print(f"fltune: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except TrainingDiverged as err:
        print(f"fltune: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ModelError, MethodError, CheckpointError, AdapterMismatchError, ValueError, OSError) as err:
        print(f"fltune: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
