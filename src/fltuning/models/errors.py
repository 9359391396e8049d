"""The one exception a user sees when a model name, folder or source package is wrong."""

from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be found, prepared or resolved; the message says what to install, pass or fix."""
