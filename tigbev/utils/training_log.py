"""``metrics.jsonl`` of a training run (teacher or student), and the loss curve drawn from it.

One JSON object per line: ``{"kind": "step", "step", "epoch", <named losses>, "lr", ...}`` every ``every`` optimiser
steps and at the last one, and ``{"kind": "epoch", "epoch", "step", <mean of every named loss over the epoch>}`` at
the end of each epoch. A fresh run starts the file anew. A resumed run keeps the records up to the checkpoint it resumes
from (``resume_step``) and drops the later ones, which the resumed run logs again, so no step appears twice; its
loss curve covers the whole run, not only the part after the resume.

With ``tensorboard`` (a folder) the same scalars also go to TensorBoard event files there: each step record's named
losses as ``loss/<name>``, their unweighted values as ``unweighted/<name>``, ``lr`` and ``step_s``, each epoch record
as ``epoch/<name>`` (at the epoch's last step), and, through :meth:`TrainingLog.evaluation`, the final metrics as
``eval/<name>`` and BEV pictures as images. A resumed run purges the events after its checkpoint, as it does the
JSON lines. Needs the optional ``tensorboard`` package (``pip install "tigbev[tensorboard]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from collections.abc import Sequence
from typing import IO, Any

from tigbev.errors import TigbevError
from tigbev.utils.plots import plot_loss_curves

__all__ = ["TrainingLog"]

_NOT_LOSSES = frozenset({"kind", "step", "epoch", "lr", "step_s", "unweighted"})
"""Keys of a step record that are not named (weighted) losses, left out of the curve; ``unweighted`` holds the
losses before their weights, when the trainer gives them."""


class TrainingLog:
    """Append-only training log; ``enabled=False`` (e.g. DDP ranks other than 0) writes and keeps nothing.

    Use as a context manager around the training loop: :meth:`step` after each optimiser step, :meth:`end_epoch`
    after each epoch, :meth:`plot` at the end.
    """

    def __init__(self, path: Path, *, every: int, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: Path | None = None):
        if every < 1:
            raise ValueError(f"TrainingLog.every must be >= 1, got {every}")
        self.path, self.every, self.enabled = Path(path), every, enabled
        self.tensorboard = None if tensorboard is None else Path(tensorboard)
        self._resume_step = resume_step
        self._tb: Any = None
        if enabled and self.tensorboard is not None:
            _summary_writer_class()  # fail before training when the package is missing
        self.steps: list[int] = []
        self.history: dict[str, list[float]] = {}
        self._sums: dict[str, float] = {}
        self._raw_sums: dict[str, float] = {}
        self._count = 0
        self._file: IO[str] | None = None
        self._kept: list[str] = []
        if enabled and resume_step is not None and self.path.exists():
            lines = self.path.read_text().splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    if number == len(lines):  # the last line, cut short by a killed run: after the checkpoint
                        break
                    raise ValueError(f"{self.path}:{number}: not a JSON line ({exc.msg}); move the file away to "
                                     "start a fresh log") from None
                if rec.get("step", 0) > resume_step:  # logged after the checkpoint: the resumed run redoes it
                    continue
                self._kept.append(line)
                if rec.get("kind") == "step":
                    self._remember(rec["step"], {k: v for k, v in rec.items() if k not in _NOT_LOSSES})

    def __enter__(self) -> TrainingLog:
        if self.enabled:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in self._kept))
            tmp.replace(self.path)  # what is kept, atomically; then append
            self._file = self.path.open("a")
            if self.tensorboard is not None:
                # Events logged after the resumed checkpoint are dropped: the resumed run logs those steps again.
                self._tb = _summary_writer_class()(
                    str(self.tensorboard), purge_step=None if self._resume_step is None else self._resume_step + 1)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _remember(self, step: int, losses: dict[str, float]) -> None:
        self.steps.append(step)
        for k, v in losses.items():
            self.history.setdefault(k, []).append(v)

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError("TrainingLog is written inside its `with` block")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            if record["kind"] == "epoch":
                scalars = {f"epoch/{k}": v for k, v in record.items() if k not in _NOT_LOSSES}
            else:
                scalars = {f"loss/{k}": v for k, v in record.items() if k not in _NOT_LOSSES}
                scalars.update({k: record[k] for k in ("lr", "step_s") if k in record})
                scalars.update({f"unweighted/{k}": v for k, v in record.get("unweighted", {}).items()})
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, float(value), step)
            self._tb.flush()

    def evaluation(self, step: int, metrics: dict[str, Any], pictures: Sequence[Path] = ()) -> None:
        """Write the final evaluation to TensorBoard (after the training loop): every scalar metric as
        ``eval/<name>``, per-class APs as ``eval/AP/<class>``, and each PNG in ``pictures`` as an image
        ``eval/<file stem>``. Nothing without ``tensorboard``."""
        if not self.enabled or self.tensorboard is None:
            return
        import numpy as np
        from PIL import Image

        writer = _summary_writer_class()(str(self.tensorboard))
        try:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    writer.add_scalar(f"eval/{k}", float(v), step)
            for cls, ap in metrics.get("per_class_AP", {}).items():
                writer.add_scalar(f"eval/AP/{cls}", float(ap), step)
            for path in pictures:
                with Image.open(path) as img:
                    writer.add_image(f"eval/{Path(path).stem}", np.asarray(img.convert("RGB")), step,
                                     dataformats="HWC")
        finally:
            writer.close()

    def step(self, step: int, epoch: int, losses: dict[str, float], *, last: bool = False,
             unweighted: dict[str, float] | None = None, **extra: float) -> None:
        """Record one optimiser step's named (weighted) losses, and optionally the same losses before their
        weights; written every ``every`` steps and when ``last``."""
        if not self.enabled:
            return
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        for k, v in (unweighted or {}).items():
            self._raw_sums[k] = self._raw_sums.get(k, 0.0) + v
        self._count += 1
        if step % self.every == 0 or last:
            raw = {"unweighted": dict(unweighted)} if unweighted is not None else {}
            self._write({"kind": "step", "step": step, "epoch": epoch, **losses, **extra, **raw})
            self._remember(step, losses)

    def end_epoch(self, epoch: int, step: int) -> None:
        """Write the epoch's mean of every named loss (nothing for an epoch without steps)."""
        if self.enabled and self._count:
            raw = {"unweighted": {k: v / self._count for k, v in self._raw_sums.items()}} if self._raw_sums else {}
            self._write({"kind": "epoch", "epoch": epoch, "step": step,
                         **{k: v / self._count for k, v in self._sums.items()}, **raw})
        self._sums, self._raw_sums, self._count = {}, {}, 0

    def plot(self, path: Path, title: str) -> Path | None:
        """The loss curves of every step record (this run's and, after a resume, the earlier ones)."""
        if not self.enabled or not self.steps:
            return None
        return plot_loss_curves(path, self.steps, self.history, title)


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TigbevError("--tensorboard needs the tensorboard package: pip install 'tigbev[tensorboard]'") from None
    return SummaryWriter
