"""Reading checkpoint files safely: weights only, never code, and errors that name the file and say what is wrong.

Every ``.pt`` / ``.pth`` tigbev reads (teacher and student checkpoints, ImageNet backbone weights, imported
mmdetection3d weights) goes through :func:`load_weights_only`: ``torch.load(weights_only=True)``, so an untrusted
file can hold tensors and plain data but never run code. A refusal is reported without torch's advice to retry with
``weights_only=False`` (the wrong advice for a file one does not trust).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

from tigbev.errors import SENTENCE_END, TigbevError, first_sentence

__all__ = ["CheckpointError", "load_weights_only", "non_finite_tensors", "refused_global",
           "require_finite", "save_atomic", "unpickler_reason"]


class CheckpointError(TigbevError):
    """A checkpoint that is missing, unreadable, or of another kind or version."""


def refused_global(exc: BaseException) -> str | None:
    """The global (``module.name``) that torch's weights-only unpickler refused, or None.

    torch words the refusal in several ways across versions ("Unsupported global: GLOBAL a.B was not an allowed
    global by default", "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"); each names
    the global after the word GLOBAL."""
    found = _GLOBAL.search(str(exc))
    return found.group(1) if found else None


def unpickler_reason(exc: BaseException) -> str:
    """torch's weights-only refusal in one sentence, without its advice to retry with ``weights_only=False``."""
    name = refused_global(exc)
    if name is not None:
        return f"it refers to the global {name}, which is not a tensor or plain data"
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    sentences = [s for s in SENTENCE_END.split(" ".join(text.split())) if s and not _ADVICE.search(s)]
    return first_sentence(" ".join(sentences)) or "unreadable"


_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*[\w])")
_ADVICE = re.compile(r"weights_only|Re-running|In PyTorch 2\.6|Check the documentation", re.IGNORECASE)


def load_weights_only(path: str | os.PathLike[str], *, what: str = "checkpoint",
                      map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a :class:`CheckpointError` naming ``what`` and the
    file: missing, a directory, empty, truncated, not a torch file, or holding objects other than weights."""
    import torch

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{what} {p} is a directory, not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} {p} is empty (0 bytes)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        name = refused_global(exc)
        if name is not None:  # a well-formed pickle of classes: code a full unpickler would run
            raise CheckpointError(f"{what} {p} holds objects other than tensors and plain data (the global {name}), "
                                  "which tigbev never unpickles: it is not a file of this kind, or not one to trust"
                                  ) from None
        raise CheckpointError(f"{what} {p} is not a torch checkpoint or is damaged ({unpickler_reason(exc)})"
                              ) from None
    except EOFError:
        raise CheckpointError(f"{what} {p} is truncated (it ends early)") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EIO):  # the file system's refusal
            raise CheckpointError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
        # torch's reader reports a cut or garbled archive as an OSError too (e.g. EINVAL from a seek past the end)
        raise CheckpointError(f"{what} {p} is not a torch checkpoint or is damaged ({type(exc).__name__}: "
                              f"{first_sentence(exc.strerror or str(exc))})") from None
    except (RuntimeError, ValueError, KeyError, AttributeError, ImportError, IndexError, struct.error) as exc:
        raise CheckpointError(f"{what} {p} is not a torch checkpoint or is damaged ({type(exc).__name__}: "
                              f"{first_sentence(str(exc))})") from None


def save_atomic(path: str | os.PathLike[str], payload: dict[str, Any], *, what: str = "checkpoint") -> Path:
    """``torch.save`` to a temporary sibling, flushed to disk, then renamed: a crash never leaves a truncated
    checkpoint behind, and a file that cannot be written (a full disk, no permission) is a :class:`CheckpointError`
    naming ``what``, the file and the system's reason, with the previous file left as it was.

    The payload is serialised in memory first: torch's own file writer reports a failed write as an internal
    error without its errno."""
    import torch

    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        kept = f"; {out} is left as it was" if out.exists() else ""
        raise CheckpointError(f"cannot write {what} {out}: {reason} (errno {exc.errno}){kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def require_finite(state: dict[str, Any], *, step: int, lr: float, path: Path) -> None:
    """Refuse to save weights that hold NaN or infinity (a good ``path`` is never overwritten with them)."""
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(f"after step {step} {len(bad)} of {len(state)} weight tensors are not finite (e.g. "
                              f"{bad[0]}); the learning rate ({lr:g}) is likely too high; {path} is left as it was")


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    import torch

    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
