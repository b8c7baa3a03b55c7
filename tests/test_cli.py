"""The main job end to end through the CLI, in a subprocess, at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bigmodel import api
from bigmodel import cli as cli_module
from bigmodel.cli import main
from bigmodel.data.digits import digits
from bigmodel.errors import InputError
from bigmodel.transfer.base import features, pixels
from tests.helpers import cli
from tests.transfer.test_reference import REFERENCES


def vit_params(width: int, depth: int, patch: int, chans: int, tokens: int, mlp: int = 4) -> int:
    """Parameters of a timm ViT backbone (class token, learned positions, pre-norm blocks, final
    norm, no head), counted by hand."""
    d = width
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d)
    return (patch * patch * chans * d + d) + d + tokens * d + depth * block + 2 * d


def vit_forward_flops(width: int, depth: int, patch: int, chans: int, tokens: int, mlp: int = 4) -> int:
    """FLOPs (2 per multiply-accumulate, matrix products only) of one image through that ViT."""
    d, n = width, tokens
    block = 2 * n * d * 3 * d + 2 * n * d * d + 2 * (2 * n * d * mlp * d) + 4 * n * n * d  # qkv, proj, MLP, QKᵀ+AV
    return 2 * (n - 1) * d * patch * patch * chans + depth * block


def correct(top1: float, n: int) -> int:
    """The number of right answers behind a top-1 % over ``n`` images (which must be a whole number)."""
    count = round(top1 * n / 100)
    assert top1 == pytest.approx(100 * count / n, abs=1e-4), f"{top1}% is no share of {n} images"
    return count


@pytest.mark.slow  # the README's command in a process of its own, figures included; `make test-all`
def test_tiny_run_end_to_end(tmp_path) -> None:
    out = tmp_path / "run"
    proc = cli("run", "quickstart", "run.tiny=true", f"run.out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "transfer (top-1 %, test split)" in proc.stdout and "report:" in proc.stdout
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "report.html"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text())["run"]["out"] == str(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-1] == "step_00000006"
    saved = {p.name for p in (out / "checkpoints" / ckpts[-1]).iterdir()}
    assert {"model.safetensors", "state.pt", "meta.json"} <= saved
    report = json.loads((out / "report.json").read_text())
    rows = report["transfer"]
    assert [(r["task"], r["protocol"]) for r in rows] == [("digits", p) for p in ("linear", "knn", "fewshot")]
    train, test = digits(split="train"), digits(split="test")
    for r in rows:
        assert set(r["results"]) == {"pretrained", "random_init", "pixels"}
        assert (r["n_train"], r["n_test"]) == (1347, 450)  # digits' stratified 75/25 split
        if r["protocol"] == "fewshot":  # 5 seeds per shot count; top1 is the 10-shot mean
            for v in r["results"].values():
                assert sorted(int(k) for k in v["per_shot"]) == [1, 5, 10]
                runs = v["per_shot"][10]["runs"] if 10 in v["per_shot"] else v["per_shot"]["10"]["runs"]
                assert len(runs) == 5 and [correct(t, 450) for t in runs]
                assert v["top1"] == pytest.approx(sum(runs) / 5, abs=1e-9)
            continue
        for v in r["results"].values():
            correct(v["top1"], 450)
        # raw pixels: exactly what the scikit-learn / numpy reference gets right
        expected = REFERENCES[r["protocol"]](r["settings"], pixels(train).numpy(), train.targets.numpy(),
                                             pixels(test).numpy(), test.targets.numpy())
        assert correct(r["results"]["pixels"]["top1"], 450) == expected
    # tiny quickstart backbone: ViT-nano (96 wide, 4 blocks) on 32² grey images in 8² patches: 16 + 1 tokens
    assert report["model"]["backbone_params"] == vit_params(96, 4, 8, 1, 17) == 455_520
    expected = vit_forward_flops(96, 4, 8, 1, 17) / 1e9
    assert report["model"]["forward_gflops_per_image"] == pytest.approx(expected, rel=1e-4)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and "loss" in metrics[-1] and "images_per_s" in metrics[-1]


# The commands below run in-process through the CLI's entry point: a subprocess each would only
# add interpreter start-up; test_tiny_run_end_to_end covers the real subprocess.


def test_transfer_command_on_a_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "fractals-vit", "run.tiny=true", "run.precision=fp32", f"run.out={out}"]) == 0
    capsys.readouterr()
    assert main(["transfer", str(out), "--task", "digits", "--protocol", "knn", "--json"]) == 0
    stdout = capsys.readouterr().out
    rows = json.loads(stdout[stdout.index("[\n"):])
    assert [(r["protocol"], list(r["results"])) for r in rows] == [("knn", ["pretrained"])]
    # the number is the reference kNN's on the checkpoint's own features
    net = api.load_backbone(out)[0]
    train, test = digits(split="train"), digits(split="test")
    expected = REFERENCES["knn"](rows[0]["settings"], features(net, train).numpy(), train.targets.numpy(),
                                 features(net, test).numpy(), test.targets.numpy())
    assert correct(rows[0]["results"]["pretrained"]["top1"], 450) == expected


def test_zoo_and_components_list(capsys) -> None:
    from bigmodel.recipe import zoo_names

    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()  # "NAME<pad to 20> first line of the recipe", maybe wrapped
    assert [ln[:20].rstrip() for ln in lines if ln[:20].rstrip() in zoo_names()] == zoo_names()
    assert main(["components"]) == 0
    stdout = capsys.readouterr().out
    for name in ("vit", "resnet", "lstm", "igpt", "fractals", "digits", "npz", "supervised", "simclr", "mae",
                 "autoregressive", "linear", "knn", "finetune", "fewshot", "architecture × objective"):
        assert name in stdout, name


def test_exit_status_tables_name_every_kind_of_bad_input() -> None:
    """The README's exit-status table and the CLI's docstring name each kind of bad input the CLI
    prints (``<kind> error:``, one per :class:`~bigmodel.errors.InputError` subclass)."""
    kinds = sorted(k.kind for k in InputError.__subclasses__())
    assert kinds == ["checkpoint", "data", "export", "image", "recipe"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| 2 |"))
    assert [k for k in kinds if f"`{k} error:`" in row] == kinds
    assert [k for k in kinds if f"``{k} error:``" in cli_module.__doc__] == kinds
