"""Per-block features of every family, the layer-wise probe, and ``bigmodel analyze`` on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from bigmodel import api
from bigmodel.analysis import cka, layerwise
from bigmodel.architectures.igpt import IGPT
from bigmodel.architectures.lstm import LSTM
from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.cli import main
from bigmodel.data.digits import digits
from bigmodel.recipe import resolve
from bigmodel.train import checkpoint
from bigmodel.transfer.base import features, pixels
from bigmodel.transfer.linear import Linear

FAMILIES = {
    "vit-token": (lambda: ViT("nano", 16, 4, 1), [f"block{i}" for i in range(1, 5)], 96),
    "vit-avg": (lambda: ViT("nano", 16, 4, 1, global_pool="avg"), [f"block{i}" for i in range(1, 5)], 96),
    "vit-moe": (lambda: ViT("nano", 16, 4, 1, moe={"experts": 2, "every": 2}), [f"block{i}" for i in range(1, 5)], 96),
    "resnet": (lambda: ResNet(18, 0.125, 16, 1, zero_init_last=False),
               [f"s{s}b{b}" for s in range(1, 5) for b in (1, 2)], None),
    "lstm": (lambda: LSTM(16, 4, 1, hidden=8, layers=3), ["layer1", "layer2", "layer3"], 16),
    "lstm-causal-tokens": (lambda: LSTM(8, 1, 1, hidden=8, layers=2, causal=True), ["layer1", "layer2"], 8),
    "igpt-last": (lambda: IGPT("tiny", 8, 1, feature_layer=4), [f"block{i}" for i in range(1, 5)], 64),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_last_block_equals_pooled_features(family: str) -> None:
    torch.manual_seed(0)
    build, names, dim = FAMILIES[family]
    net = build().eval()
    x = torch.randn(3, 1, net.image_size, net.image_size)
    with torch.no_grad():
        blocks = net.block_features(x)
        pooled = net(x)
    assert [n for n, _ in blocks] == names
    assert all(f.shape == (3, dim or f.shape[1]) for _, f in blocks)
    assert torch.equal(blocks[-1][1], pooled)
    if blocks[0][1].shape == pooled.shape:  # the first block is not the output under another name
        assert not torch.allclose(blocks[0][1], pooled)


def test_resnet_widths_per_stage() -> None:
    net = ResNet(18, 0.125, 16, 1).eval()
    with torch.no_grad():
        widths = [f.shape[1] for _, f in net.block_features(torch.randn(2, 1, 16, 16))]
    assert widths == [8, 8, 16, 16, 32, 32, 64, 64]
    assert widths[-1] == net.feature_dim


def test_igpt_feature_layer_entry_equals_pooled_features() -> None:
    """iGPT's pooled features stop at ``feature_layer`` (default: the middle block); the per-block
    features run every block, and the entry of that block equals them."""
    torch.manual_seed(0)
    net = IGPT("tiny", 8, 1).eval()
    assert net.feature_layer == 2
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        blocks = net.block_features(x)
        pooled = net(x)
    assert [n for n, _ in blocks] == ["block1", "block2", "block3", "block4"]
    assert torch.equal(blocks[1][1], pooled)
    assert not torch.allclose(blocks[-1][1], pooled)


def small_digits(n_train: int = 120, n_test: int = 80):
    tr, te = digits("train"), digits("test")
    return tr.subset(torch.arange(n_train)), te.subset(torch.arange(n_test))


def test_block_features_over_a_dataset_match_the_transfer_features() -> None:
    torch.manual_seed(0)
    net = ViT("nano", 16, 4, 1)
    _, test = small_digits()
    blocks = layerwise.block_features(net, test, batch_size=32)
    assert [(n, tuple(f.shape)) for n, f in blocks] == [(f"block{i}", (80, 96)) for i in range(1, 5)]
    assert torch.equal(blocks[-1][1], features(net, test, batch_size=32))
    assert net.training  # mode restored


def test_probe_scores_every_block_with_the_linear_protocol(tmp_path) -> None:
    torch.manual_seed(0)
    net, twin = LSTM(16, 4, 1, hidden=8, layers=2), LSTM(16, 4, 1, hidden=8, layers=2)
    train, test = small_digits()
    result = layerwise.probe(net, twin, train, test, Linear(max_iter=200), batch_size=64)
    assert [(r["block"], r["depth"]) for r in result["rows"]] == [("layer1", 1), ("layer2", 2)]
    assert result["protocol"] == {"name": "linear", **Linear(max_iter=200).settings()}
    assert result["protocol"]["C"] == "auto"
    for who, backbone in (("pretrained", net), ("random_init", twin)):
        ref_tr = layerwise.block_features(backbone, train)
        ref_te = layerwise.block_features(backbone, test)
        for row, (_, xtr), (_, xte) in zip(result["rows"], ref_tr, ref_te, strict=True):
            expected = Linear(max_iter=200).fit_score(xtr, train.targets, xte, test.targets)
            assert row[who] == round(expected["top1"], 4) and row["C"][who] == expected["C"]
    # the raw-pixel baseline: the same probe on the same images' pixels, in the result and every row
    pix = Linear(max_iter=200).fit_score(pixels(train), train.targets, pixels(test), test.targets)
    assert result["pixels"] == {"top1": round(pix["top1"], 4), "C": pix["C"], "features": 64}
    assert [(r["pixels"], r["C"]["pixels"]) for r in result["rows"]] == [(round(pix["top1"], 4), pix["C"])] * 2
    # the last block is the backbone's own features: the same number the transfer suite reports
    top = Linear(max_iter=200).fit_score(features(net, train), train.targets, features(net, test), test.targets)
    assert result["rows"][-1]["pretrained"] == round(top["top1"], 4)
    png = layerwise.curve_png(result["rows"], tmp_path / "curve.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rows(blocks: int) -> list[dict]:
    return [{"block": f"block{i}", "depth": i, "pretrained": 60.0 + i, "random_init": 40.0 + i, "pixels": 81.25}
            for i in range(1, blocks + 1)]


def test_curve_draws_the_pixel_baseline_as_a_horizontal_line() -> None:
    import matplotlib.pyplot as plt

    fig = layerwise.curve_figure(_rows(4), "t")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["pretrained", "random-init", "raw pixels (81.2)"]
    assert list(lines["raw pixels (81.2)"].get_ydata()) == [81.25, 81.25]
    assert list(lines["raw pixels (81.2)"].get_xdata()) == [0, 1]  # axes coordinates: edge to edge
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["pretrained", "random-init", "raw pixels (81.2)"]
    plt.close(fig)


@pytest.mark.parametrize("blocks, title", [
    (4, "vit × mae: linear probe per block, mnist_limit5000 (3000 train / 3000 test)"),  # was cut off
    (12, "resnet × simclr: linear probe per block, digits (1347 train / 450 test)"),
    (2, "igpt × autoregressive: linear probe per block, a_task_with_a_very_long_name_indeed "
        "(60000 train / 10000 test)"),
])
def test_the_title_lies_inside_the_figure(blocks: int, title: str) -> None:
    """Measured with matplotlib's renderer: the rendered title's box is inside the figure's, and the
    words are all there (wrapped, not cut)."""
    import matplotlib.pyplot as plt

    fig = layerwise.curve_figure(_rows(blocks), title)
    renderer = fig.canvas.get_renderer()
    box, frame = fig.axes[0].title.get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert fig.axes[0].get_title().split() == title.split()
    plt.close(fig)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "qs"
    overrides = ["run.tiny=true", "run.precision=fp32", f"run.out={out}", "run.figures=false"]
    api.run_pipeline(resolve("fractals-vit", overrides), transfer=False)  # fp32: compared with fp32 references
    return out


def test_analyze_cli_writes_curve_and_cka(tiny_run, capsys) -> None:
    assert main(["analyze", str(tiny_run), "--task", "digits", "--limit", "60"]) == 0
    printed = capsys.readouterr().out
    out = tiny_run / "analysis"
    assert sorted(p.name for p in out.iterdir()) == [
        "cka-pretrained-vs-random_init.json", "cka-pretrained-vs-random_init.png",
        "layerwise-digits.json", "layerwise-digits.png"]
    lw = json.loads((out / "layerwise-digits.json").read_text())
    assert [(r["block"], r["depth"]) for r in lw["rows"]] == [(f"block{i}", i) for i in range(1, 5)]
    assert lw["provenance"]["train_images"] == 60 and lw["provenance"]["test_images"] == 60
    # the pretrained column reproduced from the checkpoint by hand
    net, _, recipe = api.load_backbone(tiny_run)
    train, test = (d.subset(torch.arange(60)) for d in (digits("train"), digits("test")))
    ref_tr, ref_te = layerwise.block_features(net, train), layerwise.block_features(net, test)
    for row, (_, xtr), (_, xte) in zip(lw["rows"], ref_tr, ref_te, strict=True):
        assert row["pretrained"] == round(Linear().fit_score(xtr, train.targets, xte, test.targets)["top1"], 4)
        assert f"{row['pretrained']:.2f}" in printed
    sim = json.loads((out / "cka-pretrained-vs-random_init.json").read_text())
    assert (sim["a"], sim["b"], sim["images"]) == ("pretrained", "random_init", 60)
    assert sim["rows"] == sim["cols"] == [f"block{i}" for i in range(1, 5)]
    from bigmodel.train.build import random_twin

    twin_te = layerwise.block_features(random_twin(recipe), test)
    # stored to 6 digits; within 1e-6, as on a GPU the run's twin ran there and this one on the CPU
    assert sim["cka"][2][1] == pytest.approx(cka.linear_cka(ref_te[2][1], twin_te[1][1]), abs=1e-6)
    assert (out / "layerwise-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_against_itself_and_against_another_architecture(tiny_run, tmp_path, capsys) -> None:
    result = api.analyze(tiny_run, "digits", limit=40, against=checkpoint.latest(tiny_run / "checkpoints"))
    b = result["cka"]["b"]
    assert b == "qs"
    diag = [result["cka"]["cka"][i][i] for i in range(4)]
    assert diag == pytest.approx([1.0] * 4, abs=1e-6)  # the same weights: identical representations
    assert (tiny_run / "analysis" / "cka-pretrained-vs-qs.png").is_file()
    # a copy whose recipe names another architecture (drop_path differs; the weights still load)
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run / "checkpoints", other / "checkpoints")
    for meta_path in (other / "checkpoints").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["recipe"]["architecture"]["drop_path"] = 0.1
        meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["analyze", str(tiny_run), "--task", "digits", "--limit", "40", "--against", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recipe error: --against {other}: its architecture")
    assert "differs from" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--task", "digits", "--limit", "1"], "recipe error: --limit 1: must be at least 2 images per split"),
    (["--task", "nosuchset"], "recipe error: --task nosuchset: task.name = 'nosuchset': unknown dataset; valid: "),
    (["--task", "digits", "--against", "/nonexistent/run"],
     "checkpoint error: --against /nonexistent/run: no such run directory or checkpoint folder"),
])
def test_analyze_bad_input_is_one_line(tiny_run, capsys, argv, message) -> None:
    capsys.readouterr()
    assert main(["analyze", str(tiny_run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_analyze_without_a_checkpoint(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path), "--task", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"checkpoint error: {tmp_path}: no complete checkpoint "
                   f"(expected a run directory or checkpoints/step_*)")


def test_analyze_against_a_finetuned_copy(tiny_run, capsys) -> None:
    """``--finetune``: CKA between the pretrained backbone and a copy fine-tuned on the task, which is
    the protocol's own (deterministic) fine-tune: refitting it here gives the same cells."""
    from bigmodel.transfer.finetune import Finetune

    assert main(["analyze", str(tiny_run), "--task", "digits", "--limit", "50", "--finetune", "steps=4",
                 "batch_size=16", "lr=0.5", "warmup_steps=0"]) == 0
    sim = json.loads((tiny_run / "analysis" / "cka-pretrained-vs-finetuned.json").read_text())
    assert (sim["a"], sim["b"]) == ("pretrained", "finetuned")
    ft = sim["provenance"]["finetune"]
    assert ft["schedule"]["steps"] == 4 and ft["settings"]["batch_size"] == 16
    net, _, _ = api.load_backbone(tiny_run)
    train, test = (d.subset(torch.arange(50)) for d in (digits("train"), digits("test")))
    protocol = Finetune(steps=4, batch_size=16, lr=0.5, warmup_steps=0)
    model, _ = protocol.fit(net, train)
    assert ft["top1"] == 100.0 * (protocol.predict_proba(model, test).argmax(1) == test.targets).float().mean().item()
    mine, tuned = layerwise.block_features(net, test), layerwise.block_features(model.backbone, test)
    for i in range(4):
        assert sim["cka"][i][i] == round(cka.linear_cka(mine[i][1], tuned[i][1]), 6)
    assert sim["cka"][3][3] < 1.0  # fine-tuning moved the last block
    assert main(["analyze", str(tiny_run), "--task", "digits", "--finetune", "steps=0"]) == 2


def test_a_wrapped_title_keeps_its_parenthesis_on_one_line() -> None:
    import matplotlib.pyplot as plt

    fig = layerwise.curve_figure(_rows(4), "vit × supervised: linear probe per block, digits (60 train / 60 test)")
    assert fig.axes[0].get_title().split("\n") == ["vit × supervised: linear probe per block, digits",
                                                   "(60\u00a0train\u00a0/\u00a060\u00a0test)"]
    plt.close(fig)


def test_the_analyze_table_shows_the_pixel_probe_beside_every_block():
    """The console table of ``bigmodel analyze``: per block, pretrained / random-init / raw-pixel probe
    and the CKA diagonal, as the JSON rows hold them."""
    import io

    from rich.console import Console

    from bigmodel.analysis.analyze import table

    rows = [{"block": "block1", "pretrained": 88.6667, "random_init": 82.2222, "pixels": 97.1111},
            {"block": "block2", "pretrained": 90.2222, "random_init": 84.4444, "pixels": 97.1111}]
    sim = {"b": "random_init", "cols": ["block1", "block2"], "cka": [[0.23, 0.1], [0.1, 0.258]]}
    out = io.StringIO()
    Console(file=out, width=120).print(table(rows, sim))
    text = out.getvalue().splitlines()
    header = [c.strip() for c in next(ln for ln in text if ln.startswith("┃")).split("┃")[1:-1]]
    body = [[c.strip() for c in ln.split("│")[1:-1]] for ln in text if ln.startswith("│")]
    assert header == ["block", "pretrained %", "random-init %", "pixels %", "CKA vs random_init"]
    assert body == [["block1", "88.67", "82.22", "97.11", "0.230"], ["block2", "90.22", "84.44", "97.11", "0.258"]]
