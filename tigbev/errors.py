"""Errors that name what the user must fix. The CLI prints them without a traceback."""

from __future__ import annotations

__all__ = ["DatasetError", "TigbevError"]


class TigbevError(Exception):
    """Base of the project's user-facing errors: the message names the file, sample, field or split at fault."""


class DatasetError(TigbevError):
    """A dataroot, table, sensor file or split that cannot be used as it is."""
