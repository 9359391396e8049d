"""The model cache: where prepared folders live, and how one is built without ever looking finished too early.

Layout: ``$FLTUNING_CACHE`` (default ``~/.cache/fltuning``) / ``models`` / ``<name>`` / the model files plus a
marker file, ``.fltuning-prepared.json``, written last. A folder counts as prepared only when its marker exists
and names the current ``format_version`` of its builder.

Building (``build_once``) happens in a temporary folder beside the destination (same filesystem), the marker is
written last, and ``os.replace`` moves the folder into place in one step, so a crash or an exception leaves at
worst a hidden ``.<name>.tmp-*`` folder, never a finished-looking one. An exclusive lock file
(``.<name>.lock``, ``fcntl.flock``) serialises processes that prepare the same model: the second one waits and
then reuses the first one's folder. Without ``fcntl`` (Windows) a lost rename race is resolved by keeping the
folder that got there first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fltuning.models.errors import ModelError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_ENV = "FLTUNING_CACHE"
MARKER = ".fltuning-prepared.json"


def cache_root() -> Path:
    """``$FLTUNING_CACHE`` if set, else ``~/.cache/fltuning``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fltuning"


def models_dir() -> Path:
    """The folder holding one prepared folder per model name."""
    return cache_root() / "models"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the folder has no (readable) marker."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_prepared(folder: Path, format_version: int) -> bool:
    """True when ``folder`` holds a finished build made by builder ``format_version``."""
    marker = read_marker(folder)
    return marker is not None and marker.get("format_version") == format_version


def build_once(
    dest: Path,
    build: Callable[[Path], None],
    format_version: int,
    info: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Return ``dest`` prepared: reuse a finished build, else run ``build(tmp_folder)`` and move it into place.

    ``build`` writes the model files into the (empty, existing) folder it is given. ``info`` is stored in the
    marker next to ``format_version``. ``force`` rebuilds even when a finished build exists.
    Raises:
        ModelError: the cache folder cannot be created.
        Exception: whatever ``build`` raises, after its partial folder is removed.
    """
    if not force and is_prepared(dest, format_version):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(
            f"cannot create the model cache folder {dest.parent} ({error}); set {CACHE_ENV} to a writable folder"
        ) from error
    with _exclusive(dest):
        if not force and is_prepared(dest, format_version):
            return dest  # another process finished it while this one waited for the lock
        _remove_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared $FLTUNING_CACHE should stay readable
        try:
            start = time.perf_counter()
            build(tmp)
            marker = {"format_version": format_version, **(info or {})}
            marker["prepared_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            marker["build_seconds"] = round(time.perf_counter() - start, 1)
            _write_json_atomically(tmp / MARKER, marker)
            _move_into_place(tmp, dest, format_version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful move
    return dest


@contextlib.contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock for building ``dest`` (a no-op without ``fcntl``)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is preparing %s", dest)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(dest: Path) -> None:
    """Delete the temporary folders of builds that died (safe: the caller holds the lock)."""
    if fcntl is None:  # pragma: no cover - without a lock, another process may own these folders
        return
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in dest.parent.glob(f".{dest.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(tmp: Path, dest: Path, format_version: int) -> None:
    """Replace ``dest`` by ``tmp`` in one rename; whatever was at ``dest`` is moved aside first and deleted."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        # Lost a race with a process that did not take the lock: keep its folder if it is finished.
        if not is_prepared(dest, format_version):
            raise
    finally:
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
