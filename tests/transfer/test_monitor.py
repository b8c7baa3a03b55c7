"""``run.monitor``: a frozen probe every N pretraining steps. Its value at step N is the transfer
protocol's own score of the checkpoint of step N (step 0: the random-init twin); a run with the
monitor ends with the weights of one without it, also when stopped and resumed; a monitor that draws
from the global RNG changes nothing either (the trainer forks it); ``images_per_s`` leaves the
monitor's time out; the report draws it against steps and FLOPs; bad settings are one recipe error
naming the key; two processes (DDP, FSDP2) log what one logs, without a deadlock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from bigmodel import api
from bigmodel.analysis import report as run_report
from bigmodel.data.digits import digits
from bigmodel.recipe import RecipeError, resolve, validate
from bigmodel.train import build, checkpoint, trainer
from bigmodel.transfer import base, monitor
from bigmodel.transfer.knn import KNN
from tests.train import dist_cases
from tests.train.test_resume import sigterm_after
from tests.train.test_trainer import Toy, _batches

LIMIT, K = 120, 5
MONITOR = {"task": "digits", "protocol": "knn", "k": K, "every": 2, "limit": LIMIT}


def recipe(out: Path, with_monitor: bool = True):
    run = {"out": str(out), "precision": "fp32", "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
           "figures": False, "deterministic": True, **({"monitor": MONITOR} if with_monitor else {})}
    return validate({
        "architecture": {"name": "vit", "size": "nano", "image_size": 16, "patch_size": 4, "in_chans": 1},
        "data": {"name": "fractals", "classes": 4, "images_per_class": 8, "image_size": 16, "channels": 1,
                 "points": 500},
        "objective": {"name": "mae", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
        "optim": {"name": "adamw", "batch_size": 8, "steps": 4, "warmup_steps": 1, "lr": 1e-3},
        "run": run})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def monitored(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["monitor_top1"]) for r in records(run_dir) if "monitor_top1" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint.latest(run_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """4 MAE steps with the monitor (every 2), without it, and with it stopped by SIGTERM at step 2
    (a monitor step) then resumed."""
    out, quiet = tmp_path_factory.mktemp("monitor"), Console(quiet=True)
    for name, on in (("whole", True), ("plain", False)):
        api.run_pipeline(recipe(out / name, on), quiet, transfer=False)
    with sigterm_after(2):
        first = api.run_pipeline(recipe(out / "stopped"), quiet, transfer=False)["pretrain"]
    assert (first["stopped"], first["steps_done"]) == (True, 2)
    api.run_pipeline(recipe(out / "stopped"), quiet, transfer=False)
    return out


def reference_knn(backbone: torch.nn.Module | None) -> float:
    """kNN top-1 of the transfer protocol on the fixed subset, computed here from the task itself
    (``None``: on the raw pixels)."""
    def fixed(split):
        data = digits(split=split)
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:LIMIT].sort().values
        return data.subset(keep)

    train, test = fixed("train"), fixed("test")
    if backbone is None:
        x_train, x_test = base.pixels(train), base.pixels(test)
    else:
        x_train, x_test = base.features(backbone, train), base.features(backbone, test)
    return KNN(k=K).fit_score(x_train, train.targets, x_test, test.targets)["top1"]


def test_each_value_is_the_protocols_score_of_that_steps_weights(runs: Path):
    run_dir = runs / "whole"
    logged = dict(monitored(run_dir))
    assert sorted(logged) == [0, 2, 4]
    r = recipe(run_dir)
    assert logged[0] == reference_knn(build.random_twin(r).eval())  # step 0: the weights pretraining starts from
    folder = run_dir / "checkpoints"
    for step in (2, 4):
        backbone = build.random_twin(r)
        state = load_file(str(folder / f"step_{step:08d}" / "model.safetensors"))
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
        assert logged[step] == reference_knn(backbone.eval())
    assert logged[4] != logged[0]  # the weights moved, and the probe saw it
    pixels = [rec["monitor_top1_pixels"] for rec in records(run_dir) if "monitor_top1_pixels" in rec]
    assert pixels == [reference_knn(None)]  # the raw-pixel baseline, once, with step 0
    for rec in records(run_dir):  # monitor records stand apart from the training records
        assert ("monitor_top1" in rec) == ("monitor_s" in rec) != ("loss" in rec)


def test_the_monitor_changes_no_weight_also_across_a_stop_and_resume(runs: Path):
    plain, whole, resumed = weights(runs / "plain"), weights(runs / "whole"), weights(runs / "stopped")
    assert plain.keys() == whole.keys() == resumed.keys()
    assert [k for k in plain if not (torch.equal(plain[k], whole[k]) and torch.equal(plain[k], resumed[k]))] == []
    assert [r["loss"] for r in records(runs / "plain")] == [r["loss"] for r in records(runs / "whole") if "loss" in r]
    assert monitored(runs / "stopped") == monitored(runs / "whole")  # step 2 logged once, before its checkpoint
    assert not any("monitor_top1" in r for r in records(runs / "plain"))


def test_report_draws_the_values_against_steps_and_flops(runs: Path):
    run_dir = runs / "whole"
    json_path, html_path = run_report.write(run_dir, {"recipe": recipe(run_dir).raw,
                                                      "model": {"train_gflops_per_step": 0.25}})
    section = json.loads(json_path.read_text())["monitor"]
    logged = monitored(run_dir)
    assert section["step"] == [s for s, _ in logged] and section["top1"] == [v for _, v in logged]
    assert section["pretrain_flops"] == [0.0, 0.5e9, 1.0e9]
    assert section["pixels_top1"] == reference_knn(None)  # drawn as the second baseline
    assert (section["task"], section["protocol"], section["k"], section["every"], section["limit"]) == (
        "digits", "knn", K, 2, LIMIT)
    assert json.loads(json_path.read_text())["curves"]["step"] == [1, 2, 3, 4]  # training records only
    page = html_path.read_text()
    assert "Transfer during pretraining (run.monitor)" in page and 'alt="monitor curve"' in page


class Dropping(Toy):
    """Toy whose forward draws from the global RNG (dropout), as MAE's masks do."""

    def forward(self, views, labels):
        return {"loss": F.cross_entropy(F.dropout(self.lin(views[0]), 0.5, training=True), labels)}


def fit(run_dir: Path | None, probe) -> tuple[Toy, dict]:
    """10 steps (as many as ``_batches`` yields), logged every 2, the probe every 3."""
    model = Dropping()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = trainer.Loop(steps=10, run_dir=run_dir, checkpoint_every=100, log_every=2, monitor=probe,
                        monitor_every=3, tensorboard=run_dir is not None)
    return model, trainer.fit(model, opt, lambda s: 0.1, _batches, loop, Console(quiet=True))


def test_images_per_s_counts_training_time_only_and_the_rng_is_untouched(tmp_path: Path, monkeypatch):
    """A clock that advances 1 s per optimizer step and 100 s per monitor call: every interval of
    2 steps × 8 images reads 8 images/s, with a monitor call inside or not; the monitor draws from
    the global RNG and changes nothing."""
    now = [0.0]
    monkeypatch.setattr(trainer, "_clock", lambda: now[0])
    calls = []

    def probe(step: int, net: torch.nn.Module) -> dict[str, float]:
        calls.append((step, net.training))
        torch.rand(1000)  # would shift the dropout masks of every later step, were the RNG not forked
        now[0] += 100.0
        return {"monitor_top1": float(step)}

    handle = register_optimizer_step_post_hook(lambda *_: now.__setitem__(0, now[0] + 1.0))
    try:
        model, out = fit(tmp_path, probe)
    finally:
        handle.remove()
    reference, _ = fit(None, None)
    assert torch.equal(model.lin.weight, reference.lin.weight)
    steps = [0, 3, 6, 9, 10]  # step 0, every 3, the last
    assert calls == [(s, True) for s in steps]  # the module is in training mode again after each
    train = [r for r in out["history"] if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10] and {r["images_per_s"] for r in train} == {8.0}
    mon = [r for r in out["history"] if "monitor_top1" in r]
    assert [(r["step"], r["monitor_s"]) for r in mon] == [(s, 100.0) for s in steps]
    assert records(tmp_path) == out["history"]
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/monitor_top1")] == [(s, float(s)) for s in steps]


KNN_ON_DIGITS = {"task": "digits", "protocol": "knn"}


@pytest.mark.parametrize("value, message", [
    ({**KNN_ON_DIGITS, "protocol": "finetune"},
     "run.monitor.protocol = 'finetune': not a frozen-feature protocol; valid: fewshot, knn, linear"),
    ({**KNN_ON_DIGITS, "protocol": "knm"},
     "run.monitor.protocol = 'knm': unknown protocol; valid: fewshot, knn, linear"),
    ({**KNN_ON_DIGITS, "every": 0}, "run.monitor.every = 0: input should be greater than or equal to 1"),
    ({**KNN_ON_DIGITS, "every": 2.5}, "run.monitor.every = 2.5: input should be a valid integer"),
    ({**KNN_ON_DIGITS, "limit": 0}, "run.monitor.limit = 0: input should be greater than or equal to 1"),
    ({**KNN_ON_DIGITS, "kk": 3}, "run.monitor.protocol.kk: unknown key; valid keys: k, temperature"),
    ({**KNN_ON_DIGITS, "task": "nodata"}, "run.monitor.task.name = 'nodata': unknown dataset; valid:"),
    ({"protocol": "knn"}, "run.monitor: needs task and protocol"),
    ("knn", "run.monitor: needs task and protocol"),
])
def test_bad_settings_are_one_recipe_error_naming_the_key(value, message):
    with pytest.raises(RecipeError) as e:
        validate({**recipe(Path("unused")).raw, "run": {"monitor": value}})
    assert str(e.value).startswith(message)


def test_a_task_the_protocol_cannot_serve_is_refused_before_the_run_starts(tmp_path: Path):
    r = resolve("fractals-vit", ["run.tiny=true", f"run.out={tmp_path / 'run'}",
                               "run.monitor={task: digits, protocol: knn, k: 20, limit: 10}"])
    with pytest.raises(RecipeError, match=r"^run.monitor \(digits · knn, limit 10\): k = 20 is more than the 10 "):
        api.run_pipeline(r, Console(quiet=True))
    assert not (tmp_path / "run").exists()
    assert monitor.check(None) is None


@pytest.mark.slow  # a group of 2 processes; `make test-all`
def test_two_processes_log_the_values_of_one(tmp_path: Path):
    """DDP (rank 0 scores alone) and FSDP2 (every rank gathers the shards first) end without a
    deadlock; the last value is the score of the 2-process run's own final weights, and the values
    are one process's up to one image (the weights agree to float noise: a kNN vote may flip)."""
    cases = ("monitor_ddp", "monitor_fsdp")
    for p in dist_cases.launch(2, tmp_path / "two", *cases):
        assert p.returncode == 0, p.stderr[-4000:]
    for case in cases:
        dist_cases.train(case, tmp_path / "one" / case)
        two, one = monitored(tmp_path / "two" / case), monitored(tmp_path / "one" / case)
        assert [s for s, _ in two] == [s for s, _ in one] == [0, 2, 4]  # written once, by rank 0
        assert len({v for _, v in two}) > 1  # the score moves: stale weights would not pass
        assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=100 / LIMIT + 1e-6)
        backbone = build.random_twin(dist_cases.recipe(case, tmp_path / "unused"))
        state = dist_cases.final_weights(tmp_path / "two" / case)
        backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                  if k.startswith("backbone.")})
        # features here and on rank 0 run with other thread counts: float noise may flip one kNN vote
        assert two[-1][1] == pytest.approx(reference_knn(backbone.eval()), abs=100 / LIMIT + 1e-6)
