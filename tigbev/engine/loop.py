"""The training scaffold the three training stages share (train-teacher, pretrain-backbone, train-student): the step
plan, resuming, the run directory, the finite-loss check and optimiser step, and the checkpoint.

Each stage keeps its own loop body (what a batch is, which losses); what every run does the same way lives here, so
a rule (``max_steps`` never changes the schedule, a non-finite loss stops the run before the step, weights are
checked finite before every save, a resumed run continues the same curve) is written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tigbev.checkpoint_file import require_finite, save_atomic
from tigbev.errors import TigbevError
from tigbev.utils.device import pick_device
from tigbev.utils.provenance import write_json_atomic
from tigbev.utils.run_dir import check_resume, check_run_dir, remove_temporaries
from tigbev.utils.workers import stopping_workers

__all__ = ["RunStart", "StepLog", "StepPlan", "adamw_one_cycle", "backward_step", "begin_run", "plan_steps",
           "restore", "run_epochs", "save_training_state", "start_run_dir"]


@dataclass(frozen=True)
class RunStart:
    out: Path
    checkpoint: Path
    """``out/last.pt``: what a run saves after every epoch and resumes from."""
    resuming: bool
    device: torch.device


def begin_run(out: Path, *, resume: bool, seed: int, device: str) -> RunStart:
    """A training stage's first steps: check the run directory (new, empty, or this stage's run with ``resume``;
    nothing is written yet), seed torch, pick the device."""
    resuming = check_run_dir(out, resume=resume)
    torch.manual_seed(seed)
    return RunStart(out=out, checkpoint=out / "last.pt", resuming=resuming, device=pick_device(device))


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run takes."""

    steps_per_epoch: int
    schedule_steps: int
    """``epochs * steps_per_epoch``: what the learning-rate schedule spans."""
    total_steps: int
    """Where the run stops: ``max_steps`` stops early without changing the schedule, so a resumed or extended run
    continues the same curve."""


def plan_steps(num_samples: int, batch_size: int, epochs: float, max_steps: int | None) -> StepPlan:
    """The steps of ``epochs`` epochs (a fraction spans the whole steps it covers) of ``num_samples``."""
    steps_per_epoch = math.ceil(num_samples / batch_size)
    schedule_steps = round(epochs * steps_per_epoch)
    return StepPlan(steps_per_epoch, schedule_steps,
                    schedule_steps if max_steps is None else min(schedule_steps, max_steps))


def adamw_one_cycle(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, plan: StepPlan,
                    pct_start: float) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW with a one-cycle schedule over the whole plan (from lr / 10 up to lr, then down to lr / 1000)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=plan.schedule_steps,
                                                          pct_start=pct_start, div_factor=10.0,
                                                          final_div_factor=100.0)


def restore(ckpt_path: Path, ckpt: dict[str, Any], config: dict[str, Any], model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, extra_differences: Iterable[str] = ()
            ) -> tuple[int, int]:
    """Resume from a loaded checkpoint of the same run (refused, naming what differs, otherwise): the weights,
    optimiser and schedule. Returns (epoch, step) to continue from."""
    check_resume(ckpt_path, ckpt.get("train_config", {}), config, list(extra_differences))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    return ckpt["epoch"], ckpt["step"]


def start_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Create the run directory, drop the temporaries a killed run left, and write the resolved config."""
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    write_json_atomic(out / "config.json", config)


def backward_step(loss: torch.Tensor, losses: dict[str, torch.Tensor], params: Callable[[], Iterable[nn.Parameter]],
                  optimizer: torch.optim.Optimizer, grad_clip: float, *, what: str,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Stop on a non-finite loss (naming ``what`` and every term), else backward, clip and step (through the AMP
    ``scaler`` when given)."""
    if not torch.isfinite(loss):
        raise TigbevError(f"non-finite {what}: { {k: float(v) for k, v in losses.items()} }")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params(), grad_clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def save_training_state(path: Path, model: nn.Module, *, epoch: int, step: int, lr: float,
                        optimizer: torch.optim.Optimizer, scheduler: Any, **fields: Any) -> Path:
    """The resumable checkpoint: weights (refused when not finite, before anything is written), optimiser, schedule,
    epoch and step, plus the stage's own ``fields`` (format, configs, provenance)."""
    state = model.state_dict()
    require_finite(state, step=step, lr=lr, path=path)
    return save_atomic(path, {**fields, "model": state, "epoch": epoch, "step": step,
                              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})


@dataclass(frozen=True)
class StepLog:
    """What one optimiser step reports: its named (weighted) losses with ``total``, optionally the same terms
    before their weights, and other per-step numbers (``step_s``)."""

    losses: dict[str, float]
    unweighted: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)


def run_epochs(*, what: str, epochs: int, epoch0: int, step: int, plan: StepPlan,
               loader_for: Callable[[int], Iterable[Any]], body: Callable[[Any, int], StepLog], scheduler: Any,
               log: Any, save: Callable[[int, int], None], progress: bool = True) -> tuple[int, StepLog | None]:
    """The epoch loop of every training stage: for each epoch from ``epoch0``, the batches of ``loader_for(epoch)``
    through ``body(batch, step)`` (forward, losses, :func:`backward_step`), then the schedule's step, a progress bar
    with the loss and learning rate, and the training log; at ``plan.total_steps`` it stops. After each epoch, the
    log's epoch line and ``save(epochs_done, step)``: an epoch cut short by ``max_steps`` is not counted as done,
    so a resumed run redoes it from its start (its steps keep counting). Returns the last step and its log."""
    from tqdm import tqdm

    last: StepLog | None = None
    for epoch in range(epoch0, epochs):
        if step >= plan.total_steps:
            break
        loader = loader_for(epoch)
        finished = True
        with stopping_workers(loader) as batches:
            bar = tqdm(batches, total=len(loader) if isinstance(loader, Sized) else None,
                       desc=f"{what} epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
            for batch in bar:
                last = body(batch, step)
                scheduler.step()
                step += 1
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{last.losses['total']:.3f}", lr=f"{lr:.1e}")
                log.step(step, epoch, last.losses, last=step == plan.total_steps, lr=lr, unweighted=last.unweighted,
                         **last.extra)
                if step >= plan.total_steps:
                    finished = step % plan.steps_per_epoch == 0
                    break
        log.end_epoch(epoch, step)
        save(epoch + 1 if finished else epoch, step)
    return step, last
