"""The epoch loop every training stage shares (tigbev.engine.loop.run_epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tigbev.engine.loop import StepLog, plan_steps, run_epochs
from tigbev.utils.training_log import TrainingLog


def _run(tmp_path: Path, *, samples: int, batch: int, epochs: int, max_steps: int | None, epoch0: int = 0,
         step: int = 0, resume: bool = False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = plan_steps(samples, batch, epochs, max_steps)
    param = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    seen, saves = [], []

    def loader_for(epoch: int):
        return [(epoch, i) for i in range(0, samples, batch)]

    def body(item, step: int) -> StepLog:
        seen.append((item, step))
        opt.zero_grad()
        (param * 1.0).backward()
        opt.step()
        return StepLog({"total": float(step)}, unweighted={"total": 2.0 * step}, extra={"step_s": 0.01})

    with TrainingLog(tmp_path / "metrics.jsonl", every=1, resume_step=step if resume else None) as log:
        last_step, last = run_epochs(what="test", epochs=epochs, epoch0=epoch0, step=step, plan=plan,
                                     loader_for=loader_for, body=body, scheduler=sched, log=log,
                                     save=lambda done, s: saves.append((done, s)), progress=False)
    return plan, last_step, last, seen, saves


def test_a_full_run_counts_every_epoch_and_logs_every_step(tmp_path: Path) -> None:
    plan, step, last, seen, saves = _run(tmp_path, samples=10, batch=4, epochs=2, max_steps=None)
    assert plan.steps_per_epoch == 3 and step == plan.total_steps == 6
    assert [s for _, s in seen] == list(range(6)) and [e for (e, _), _ in seen] == [0, 0, 0, 1, 1, 1]
    assert saves == [(1, 3), (2, 6)]
    assert last is not None and last.losses["total"] == 5.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("kind") != "epoch"]
    assert [x["step"] for x in steps] == list(range(1, 7)) and steps[-1]["unweighted"]["total"] == 10.0
    assert sum(x.get("kind") == "epoch" for x in lines) == 2


def test_an_epoch_cut_short_by_max_steps_is_not_counted_as_done(tmp_path: Path) -> None:
    # 3 steps per epoch, the run stops after 4: epoch 2 is cut short and must be redone on resume.
    _, step, _, seen, saves = _run(tmp_path, samples=10, batch=4, epochs=3, max_steps=4)
    assert step == 4 and len(seen) == 4 and saves == [(1, 3), (1, 4)]
    # Stopping exactly at an epoch's end counts that epoch.
    _, step, _, _, saves = _run(tmp_path / "b", samples=10, batch=4, epochs=3, max_steps=6)
    assert step == 6 and saves == [(1, 3), (2, 6)]


def test_a_finished_plan_runs_no_step(tmp_path: Path) -> None:
    _, step, last, seen, saves = _run(tmp_path, samples=10, batch=4, epochs=2, max_steps=None, epoch0=1, step=6,
                                      resume=True)
    assert step == 6 and last is None and seen == [] and saves == []
