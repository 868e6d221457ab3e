"""Reading checkpoint files safely: weights only, never code, and errors that name the file and say what is wrong.

Every ``.pt`` / ``.pth`` tigbev reads (teacher and student checkpoints, ImageNet backbone weights, imported
mmdetection3d weights) goes through :func:`load_weights_only`: ``torch.load(weights_only=True)``, so an untrusted
file can hold tensors and plain data but never run code. A refusal is reported without torch's advice to retry with
``weights_only=False`` (the wrong advice for a file one does not trust).
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Any

from tigbev.errors import TigbevError

__all__ = ["CheckpointError", "load_weights_only", "non_finite_tensors", "require_finite", "save_atomic",
           "unpickler_reason"]


class CheckpointError(TigbevError):
    """A checkpoint that is missing, unreadable, or of another kind or version."""


def unpickler_reason(exc: BaseException) -> str:
    """torch's weights-only refusal without its advice to retry with ``weights_only=False``."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())


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
        reason = unpickler_reason(exc)
        if "Unsupported global" in reason:  # a well-formed pickle of classes: code a full unpickler would run
            raise CheckpointError(f"{what} {p} holds objects other than tensors and plain data, which tigbev never "
                                  f"unpickles ({reason}); it is not a file of this kind, or not one to trust"
                                  ) from None
        raise CheckpointError(f"{what} {p} is not a torch checkpoint or is damaged ({reason[:160]})") from None
    except EOFError:
        raise CheckpointError(f"{what} {p} is truncated (it ends early)") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError, KeyError, AttributeError, ImportError, IndexError, struct.error) as exc:
        first = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"{what} {p} is not a torch checkpoint or is damaged ({type(exc).__name__}: "
                              f"{first})") from None


def save_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary sibling, then rename: a crash never leaves a truncated checkpoint behind."""
    import torch

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        tmp.replace(out)
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
