"""trainer.fit, the one training loop: what it logs, checkpoints and resumes, with and without a
run directory; train_step's gradient accumulation; pretraining goes through it."""

from __future__ import annotations

import inspect
import io
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from bigmodel.train import checkpoint, trainer
from bigmodel.train.trainer import Loop, NonFiniteLoss, fit, train_step


class Toy(nn.Module):
    """An objective-like module: uint8 (B, 1, 2, 2) → 4 pixels → 3 logits; views scale by the step's noise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [images.float().flatten(1) / 255 + 0.01 * torch.randn(len(images), 4, generator=generator)]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.lin(views[0]), labels)}

    def after_step(self, step: int) -> None:  # the Objective hook; records what the loop saw
        self.__dict__.setdefault("seen", []).append((step, self.lin.weight.detach().clone()))


def _batches(start: int):
    for step in range(start, 10):
        g = torch.Generator().manual_seed(step)
        images = torch.randint(0, 256, (8, 1, 2, 2), generator=g, dtype=torch.uint8)
        yield images, torch.randint(0, 3, (8,), generator=g)


def _fit(model: Toy, loop: Loop, console: Console | None = None) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return fit(model, opt, lambda s: 0.1 / (1 + s), _batches, loop, console or Console(quiet=True))


def test_the_loop_fits_on_a_screen():
    assert len(inspect.getsource(fit).splitlines()) <= 80  # STYLE.md 8


def test_without_a_run_dir_nothing_is_written_and_history_has_the_logged_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _fit(Toy(), Loop(steps=10, log_every=4))
    assert list(tmp_path.iterdir()) == []
    assert [r["step"] for r in out["history"]] == [4, 8, 10]  # every log_every steps and the last
    assert [r["lr"] for r in out["history"]] == [0.1 / 4, 0.1 / 8, 0.1 / 10]  # step s (0-based) logs as s + 1
    assert (out["steps_done"], out["stopped"]) == (10, False)


def test_after_step_runs_after_each_optimizer_step_and_before_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Toy()
    _fit(model, Loop(steps=10, log_every=4, run_dir=tmp_path / "run", checkpoint_every=5))
    assert [s for s, _ in model.seen] == list(range(10))
    # the hook sees the weights the optimizer step just wrote: those the step-5 checkpoint holds
    saved = Toy()
    checkpoint.load_weights(tmp_path / "run" / "checkpoints" / "step_00000005", saved)
    assert torch.equal(model.seen[4][1], saved.lin.weight)
    assert not torch.equal(model.seen[3][1], model.seen[4][1])


def test_a_run_dir_gets_checkpoints_metrics_and_an_exact_resume(tmp_path, monkeypatch):
    whole = Toy()
    _fit(whole, Loop(steps=10, log_every=1, run_dir=tmp_path / "whole", checkpoint_every=3, keep_checkpoints=5,
                     meta={"what": "toy"}))
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == \
        ["step_00000003", "step_00000006", "step_00000009", "step_00000010"]
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "whole"))["what"] == "toy"

    real, calls = trainer.train_step, []

    def dies_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dies_at_step_8)
    loop = Loop(steps=10, log_every=1, run_dir=tmp_path / "killed", checkpoint_every=3)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(Toy(), loop)
    monkeypatch.setattr(trainer, "train_step", real)
    text = io.StringIO()
    resumed = Toy()
    out = _fit(resumed, loop, Console(file=text, width=300))
    assert "resuming from" in text.getvalue() and [r["step"] for r in out["history"]] == [7, 8, 9, 10]
    pairs = zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, 11))


def test_sigterm_finishes_the_step_checkpoints_and_stops(tmp_path):
    calls = []

    class Stops(Toy):
        def forward(self, views, labels):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(views, labels)

    out = _fit(Stops(), Loop(steps=10, run_dir=tmp_path, checkpoint_every=100))
    assert (out["steps_done"], out["stopped"]) == (2, True)
    assert checkpoint.latest(tmp_path).name == "step_00000002"


def test_a_non_finite_loss_stops_with_one_line(tmp_path):
    class Nan(Toy):
        def forward(self, views, labels):
            return {"loss": super().forward(views, labels)["loss"] * float("nan")}

    with pytest.raises(NonFiniteLoss, match=r"^loss became nan at step 1; the last good checkpoint stays in "
                                            r".*checkpoints "
                                            r"\(try a lower optim.lr\)$"):
        _fit(Nan(), Loop(steps=10, log_every=2, run_dir=tmp_path))


def test_train_step_accumulates_micro_batches_into_the_full_batch_gradient():
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grads = []
    for accum in (1, 2, 4):
        model = Toy()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        before = model.lin.weight.detach().clone()
        out = train_step(model, opt, [x], y, accum_steps=accum)
        grads.append(before - model.lin.weight.detach())  # lr 1: the update is the gradient
        reference = F.cross_entropy(nn.functional.linear(x, before, Toy().lin.bias), y)
        torch.testing.assert_close(out["loss"], reference.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-7)


def test_pretraining_goes_through_fit(tmp_path, monkeypatch):
    from bigmodel import api
    from bigmodel.recipe import resolve

    seen = []

    def spy(model, opt, lr_fn, batches_fn, loop, console, net=None):
        seen.append((loop.steps, loop.label, loop.run_dir, loop.meta["recipe"]["optim"]["steps"], loop.deterministic))
        return {"start_step": 0, "steps_done": loop.steps, "stopped": False, "history": []}

    monkeypatch.setattr(trainer, "fit", spy)
    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={tmp_path / 'r'}", "run.deterministic=true"])
    api.run_pipeline(recipe, Console(quiet=True), transfer=False)
    assert seen == [(recipe.optim.steps, "pretrain", tmp_path / "r", recipe.optim.steps, True)]


def test_loop_deterministic_holds_for_every_training_step_and_ends_with_the_loop():
    class Records(Toy):
        def forward(self, views, labels):
            self.__dict__.setdefault("modes", []).append(torch.are_deterministic_algorithms_enabled())
            return super().forward(views, labels)

    for on in (True, False):
        model = Records()
        _fit(model, Loop(steps=10, deterministic=on))
        assert model.modes == [on] * 10
        assert not torch.are_deterministic_algorithms_enabled()


def test_non_finite_gradients_with_a_finite_loss_are_never_checkpointed(tmp_path):
    """No grad_clip (the fine-tune default): the gradient norm is still measured and checked."""
    class NanGrads(Toy):  # non-finite gradients in step 2 only (a checkpoint step), finite losses
        calls = 0

        def forward(self, views, labels):
            out = super().forward(views, labels)
            NanGrads.calls += 1
            if NanGrads.calls == 2:
                self.lin.weight.register_hook(lambda g: g * float("nan"))
            return out

    with pytest.raises(NonFiniteLoss, match=r"^gradient norm became nan at step 2; the last good checkpoint"):
        _fit(NanGrads(), Loop(steps=10, log_every=5, run_dir=tmp_path, checkpoint_every=2))
    assert checkpoint.latest(tmp_path) is None


def test_a_non_finite_loss_is_reported_at_its_step_not_at_the_next_log_step(tmp_path):
    """Issue 17: NaN at step 3 with log_every=20 said "at step 20"; the loop holds the first bad step on
    the device (no per-step host sync) and reports it; the checkpoint of step 2 stays the latest."""
    class NanAt3(Toy):
        calls = 0

        def forward(self, views, labels):
            out = super().forward(views, labels)
            NanAt3.calls += 1
            return {"loss": out["loss"] * float("nan")} if NanAt3.calls == 3 else out

    with pytest.raises(NonFiniteLoss, match=r"^loss became nan at step 3; the last good checkpoint stays in "):
        _fit(NanAt3(), Loop(steps=10, log_every=20, run_dir=tmp_path, checkpoint_every=4))
    assert checkpoint.latest(tmp_path) is None  # no checkpoint before step 4, none with NaN weights after

    NanAt3.calls = 0
    with pytest.raises(NonFiniteLoss, match=r"^loss became nan at step 3; "):
        _fit(NanAt3(), Loop(steps=10, log_every=20, run_dir=tmp_path / "b", checkpoint_every=2))
    assert checkpoint.latest(tmp_path / "b").name == "step_00000002"


def test_a_non_finite_gradient_between_log_steps_is_reported_with_its_value_and_step():
    class InfGradAt2(Toy):
        calls = 0

        def forward(self, views, labels):
            out = super().forward(views, labels)
            InfGradAt2.calls += 1
            if InfGradAt2.calls == 2:
                h = self.lin.weight.register_hook(lambda g: g * float("inf"))
                self.__dict__["hook"] = h
            elif "hook" in self.__dict__:
                self.__dict__.pop("hook").remove()
            return out

    with pytest.raises(NonFiniteLoss, match=r"^gradient norm became (inf|nan) at step 2; nothing was saved"):
        _fit(InfGradAt2(), Loop(steps=10, log_every=20))
