"""Errors that name what the user must fix. The CLI prints them without a traceback."""

from __future__ import annotations

import builtins
import importlib
import re
import sys

__all__ = ["SENTENCE_END", "DatasetError", "TigbevError", "first_sentence", "worker_error"]


class TigbevError(Exception):
    """Base of the project's user-facing errors: the message names the file, sample, field or split at fault."""


class DatasetError(TigbevError):
    """A dataroot, table, sensor file or split that cannot be used as it is."""


_RERAISED = re.compile(r"Caught (?P<name>\w+) [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")
_TRACEBACK = "Traceback (most recent call last):\n"


def worker_error(exc: BaseException) -> BaseException | None:
    """The error a DataLoader worker (or its pin-memory thread) raised, as that process raised it; None when
    ``exc`` is not torch's re-raise of one.

    torch sends a worker's error to the main process as its type and formatted traceback and re-raises
    ``type("Caught <Name> in DataLoader worker process <i>.\\nOriginal Traceback ...")``, or a RuntimeError where the
    type takes other arguments. The traceback's last lines are ``<module>.<Name>: <message>``: the result is an
    instance of that type (resolved in this process; tigbev's own modules are imported if need be) holding that
    message, its ``__init__`` not run, or of a stand-in of the same name where the type cannot be resolved."""
    text = str(exc) if exc.args and isinstance(exc.args[0], str) else ""
    head = _RERAISED.match(text)
    if head is None:
        return None
    last = text[text.rfind(_TRACEBACK) + len(_TRACEBACK):].splitlines()
    # The frames of the last traceback are indented; the exception's own lines follow them.
    start = next((i for i, line in enumerate(last) if line and not line[0].isspace()), None)
    if start is None:
        return None
    qualified, _, message = "\n".join(last[start:]).partition(": ")
    module, _, name = qualified.rpartition(".")
    if name != head["name"]:
        return None
    cls = _exception_type(module, name)
    if cls is not None:
        try:
            return cls.__new__(cls, message)
        except Exception:  # noqa: BLE001 - a type whose __new__ wants more: the stand-in below says the same
            pass
    return type(name, (Exception,), {"__module__": module or "builtins", "__qualname__": name})(message)


def _exception_type(module: str, name: str) -> type[BaseException] | None:
    """The exception class ``module.name`` of this process (builtins when ``module`` is empty), or None."""
    if not module:
        found = getattr(builtins, name, None)
    else:
        mod = sys.modules.get(module)
        if mod is None and (module == "tigbev" or module.startswith("tigbev.")):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                mod = None
        found = getattr(mod, name, None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[`])")
"""Where one sentence of a message ends and the next begins."""


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, whitespace collapsed and without its final period: a cause quoted in a
    message is quoted whole or not at all, never cut in the middle."""
    return SENTENCE_END.split(" ".join(text.split()), 1)[0].rstrip(".")
