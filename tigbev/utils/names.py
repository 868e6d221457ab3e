"""File names and messages built from dataset strings (sample tokens, scene names, ...).

A dataset string is data, not a name: it may hold ``/``, ``..``, a newline, a NUL or thousands of characters.
:func:`safe_name` turns one into a single, short path component that is the same for the same string and different
for different strings; :func:`shown` quotes one for a one-line message.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["safe_name", "shown"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(text: str, *, prefix_chars: int = 8, hash_chars: int = 12) -> str:
    """``<prefix>-<hash>``: the first ``prefix_chars`` characters of ``text`` with every character outside
    ``[A-Za-z0-9_-]`` replaced by ``_``, then the first ``hash_chars`` hex digits of the SHA-256 of all of ``text``
    (UTF-8). Only ``[A-Za-z0-9_-]``, at most ``prefix_chars + 1 + hash_chars`` characters, never empty, never ``.``
    or ``..``; the hash keeps distinct strings apart even where their prefixes agree. The prefix is there for
    people (a nuScenes token's first characters), the hash for uniqueness."""
    if prefix_chars < 0 or not 8 <= hash_chars <= 64:
        raise ValueError(f"safe_name: prefix_chars must be >= 0 and hash_chars in 8..64, got {prefix_chars}, "
                         f"{hash_chars}")
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:hash_chars]
    prefix = _UNSAFE.sub("_", text[:prefix_chars])
    return f"{prefix}-{digest}" if prefix else digest


def shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a one-line message: Python's repr (escapes newlines, NULs and other control
    characters), cut to ``limit`` characters of the string with ``...`` and its length when longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
