"""run.tensorboard: the scalars of metrics.jsonl, read back from the event files, step for step,
also after a run that died past its last checkpoint is resumed (the stale events are purged)."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from bigmodel.train.trainer import Loop, fit
from tests.train.test_trainer import Toy

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="the tensorboard extra is not installed")


def batches(start: int, die_at: int | None = None):
    for step in range(start, 10):
        if step == die_at:
            raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(step)
        yield (torch.randint(0, 256, (8, 1, 2, 2), generator=g, dtype=torch.uint8),
               torch.randint(0, 3, (8,), generator=g))


def train(run_dir, die_at: int | None = None) -> None:
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = Loop(steps=10, run_dir=run_dir, checkpoint_every=4, log_every=1, tensorboard=True)
    fit(model, opt, lambda s: 0.1, lambda start: batches(start, die_at), loop, Console(quiet=True))


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(torch.tensor(r[key], dtype=torch.float32))) for r in records]  # events hold float32


def test_event_files_hold_the_logged_scalars(tmp_path):
    train(tmp_path)
    got, records = scalars(tmp_path), metrics(tmp_path)
    assert sorted(got) == ["train/grad_norm", "train/images_per_s", "train/loss", "train/lr"]
    for key in ("loss", "lr", "grad_norm"):
        assert got[f"train/{key}"] == expected(records, key)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 11))


def test_a_resumed_run_has_each_step_once_with_the_resumed_values(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, die_at=6)  # steps 5 and 6 logged after the step-4 checkpoint, then lost
    train(tmp_path)
    got, records = scalars(tmp_path), metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert got["train/loss"] == expected(records, "loss")
