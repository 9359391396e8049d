"""`fltune`: the command line.

    fltune models list                 # the offline models, whether prepared, and where
    fltune models prepare e5-small     # build the standard transformers folder into the cache

Exit codes: 0 success, 2 bad input (the message names what to fix).
"""

from __future__ import annotations

import argparse
import sys
import time

from fltuning.models import ModelError, list_models, prepare_model


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fltune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", help="real pretrained weights available offline")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser("list", help="list the offline models").set_defaults(run=_models_list)
    prepare = models_commands.add_parser("prepare", help="build a model into the cache (reused afterwards)")
    prepare.add_argument("name", help="a name from `fltune models list`")
    prepare.add_argument("--force", action="store_true", help="rebuild even if already prepared (default: False)")
    prepare.set_defaults(run=_models_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelError, ValueError) as err:
        print(f"fltune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
