"""Run directories of the training stages: the one set of ``--out`` rules, checked before anything is written, and
the comparison that lets ``--resume`` continue only the same run.

Rules (train-teacher and train-student alike):

- ``--out`` is a new path, an empty directory, or a run directory of this stage;
- with a checkpoint (``last.pt``) in it, ``--resume`` continues it (and is required: nothing is overwritten);
- a run that stopped before its first checkpoint (only ``config.json``, ``metrics.jsonl``, a temporary file) holds
  nothing to resume: the same command starts it over, with or without ``--resume``;
- anything else in the directory (the user's files, another tool's output) is refused, and so is a file;
- ``--resume`` refuses a checkpoint whose run differs in a setting that shapes the training (see
  :func:`config_differences`), naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tigbev.errors import TigbevError

__all__ = ["RESUME_MAY_DIFFER", "check_output_dir", "check_resume", "check_run_dir", "config_differences",
           "remove_temporaries"]

CHECKPOINT = "last.pt"
_BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "metrics.jsonl", "loss_curve.png", "tensorboard"})
RESUME_MAY_DIFFER = frozenset({"resume", "workers", "device", "max_steps", "val_split", "out_dir", "dataroot",
                               "cache", "teacher_checkpoint", "backbone_weights", "tensorboard"})
"""Settings a resumed run may change: how and where it runs, when it stops, what it is evaluated on, and paths
(a moved dataset or cache is fine: their content is compared through fingerprints instead)."""


def _temporary(name: str) -> bool:
    return name.startswith(f".{CHECKPOINT}.tmp") or name.startswith(".config.json.tmp")


def check_run_dir(out: Path, *, resume: bool, option: str = "--out") -> bool:
    """Apply the rules above to ``out`` without writing anything; True when ``last.pt`` is to be resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TigbevError(f"{option} {out} is a file, not a run directory")
    if not out.exists():
        return False
    if (out / CHECKPOINT).exists():
        if not resume:
            raise TigbevError(f"{option} {out} holds a run ({CHECKPOINT}); pass --resume to continue it, or choose a "
                              "new directory")
        return True
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _BEFORE_FIRST_CHECKPOINT and not _temporary(p.name))
    if foreign:
        raise TigbevError(f"{option} {out} is not empty (holds {', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}) and has no {CHECKPOINT} to resume; choose a new or "
                          "empty directory")
    return False


def remove_temporaries(out: Path) -> None:
    """Remove what a killed run of this directory left half-written (its checkpoint's temporary file)."""
    for p in Path(out).iterdir():
        if _temporary(p.name) and p.is_file():
            p.unlink()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                       may_differ: Iterable[str] = RESUME_MAY_DIFFER) -> list[str]:
    """``field: checkpoint has A, this run has B`` for every nested setting that differs (top-level keys in
    ``may_differ`` aside). A setting the checkpoint predates matches only when this run leaves it at None (unset)."""
    skip = set(may_differ)
    a = {k: v for k, v in _flatten(saved).items() if k.split(".", 1)[0] not in skip}
    b = {k: v for k, v in _flatten(current).items() if k.split(".", 1)[0] not in skip}
    return [f"{k}: checkpoint has {a.get(k, '(unset)')!r}, this run has {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not (k not in a and b[k] is None)]


def check_output_dir(out: Path, *, owns: Callable[[str], bool], what: str, option: str = "--out") -> None:
    """The ``--out`` of a command that reruns into the same directory (evaluate, demo, ablate, bench): a new path,
    an empty directory, or one that holds only what ``what`` itself writes there (``owns(name)`` for each entry).
    Never a file, never a directory with anything else in it. Nothing is written here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TigbevError(f"{option} {out} is a file, not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not owns(p.name))
    if foreign:
        raise TigbevError(f"{option} {out} is not empty and not a {what} directory (holds "
                          f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or empty one")


def check_resume(checkpoint: Path, saved: Mapping[str, Any], current: Mapping[str, Any],
                 extra: Iterable[str] = ()) -> None:
    """Refuse to resume ``checkpoint`` into a run whose settings differ (:func:`config_differences`, plus
    ``extra`` differences the caller found, e.g. another teacher cache), naming every field."""
    differences = [*config_differences(saved, current), *extra]
    if differences:
        raise TigbevError(f"cannot resume {checkpoint}: this run differs from it in " + "; ".join(differences)
                          + " (choose a new --out for a new run)")
