"""Every per-run figure builder on a tiny model: the PNG is written, and the arrays it draws are
checked against a reference computation (tests/analysis/test_report.py runs them through a run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.analysis import attention, confusion, curves, embedding, figures, reconstruction
from bigmodel.architectures.resnet import ResNet  # noqa: F401  (registers resnet)
from bigmodel.data.base import TensorImages
from bigmodel.data.transforms import to_input
from bigmodel.objectives.mae import MAE, patchify
from bigmodel.objectives.supervised import Supervised
from bigmodel.registry import ARCHITECTURES


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES.build("vit", size="nano", image_size=16, patch_size=4, in_chans=1)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def blobs(n: int, seed: int, classes: int = 3) -> TensorImages:
    """Separable synthetic classes: class c is bright in horizontal band c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 1, 12, 12), generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, :, 4 * c:4 * c + 4] += 180
    return TensorImages(x.clamp(0, 255).to(torch.uint8), y)


def test_attention_maps_are_the_attention_each_block_applies():
    net = tiny_vit().eval()
    x = to_input(images(), 16, 1)
    maps = attention.attention_maps(net, x)
    assert len(maps) == 4 and maps[0].shape == (3, 3, 17, 17)  # nano: 4 blocks, 3 heads; 1 + 16 tokens
    torch.testing.assert_close(maps[2].sum(-1), torch.ones(3, 3, 17))
    # block 0's output = proj((A @ v) per head): A recomputed by the hook reproduces the fused kernel
    attn, seen = net.vit.blocks[0].attn, {}
    hook = attn.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
    net.forward_features(x)
    hook.remove()
    h = seen["inp"]
    v = attn.qkv(h).reshape(3, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    ref = attn.proj((maps[0] @ v).transpose(1, 2).reshape(3, 17, -1))
    torch.testing.assert_close(ref, seen["out"], atol=1e-5, rtol=1e-4)


def test_rollout_matches_a_naive_reference():
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(2, 3, 5, 5, generator=g).softmax(-1) for _ in range(3)]
    ref = []
    for b in range(2):
        r = np.eye(5)
        for a in maps:
            a = a[b].mean(0).numpy() + np.eye(5)
            r = (a / a.sum(1, keepdims=True)) @ r
        ref.append(r)
    out = attention.rollout(maps)
    np.testing.assert_allclose(out.numpy(), np.stack(ref), rtol=1e-5)
    np.testing.assert_allclose(out.sum(-1).numpy(), np.ones((2, 5)), rtol=1e-6)


def test_attention_figure(tmp_path: Path):
    net = tiny_vit()
    cls = attention.cls_maps(net, images(4))
    assert cls.shape == (4, 4, 4)  # (B, 16/4, 16/4)
    torch.testing.assert_close(cls.sum((1, 2)), torch.ones(4))
    x = to_input(images(4), 16, 1)
    full = attention.rollout(attention.attention_maps(net, x))[:, 0, 1:]
    torch.testing.assert_close(cls.flatten(1), full / full.sum(-1, keepdim=True))
    model = Supervised(net, num_classes=3)
    assert attention.make(model, images(4), torch.tensor([0, 1, 2, -1]), tmp_path) == tmp_path / "attention.png"
    assert (tmp_path / "attention.png").stat().st_size > 0
    cnn = Supervised(ARCHITECTURES.build("resnet", in_chans=1, image_size=16), num_classes=3)
    assert attention.make(cnn, images(4), torch.zeros(4), tmp_path / "none") is None


def test_mae_reconstruction_is_input_where_visible_and_decoder_output_where_masked(tmp_path: Path):
    torch.manual_seed(0)
    model = MAE(tiny_vit(), mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()
    imgs = images(3)
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    res = reconstruction.reconstruct(model, imgs, seed=7)
    torch.testing.assert_close(torch.rand(4), before)  # the caller's RNG is untouched
    assert res["reconstruction"].shape == (3, 1, 16, 16) and res["mask"].shape == (3, 16)
    assert res["mask"].sum(1).tolist() == [12.0, 12.0, 12.0]  # 16 patches, 4 visible
    # the same mask drawn by hand, then the objective's own encoder + decoder
    x = to_input(imgs, 16, 1)
    torch.manual_seed(7)
    ids_keep, ids_restore, mask = model.random_mask(3, x.device)
    with torch.no_grad():
        pred = model.decode(model.backbone.forward_visible(x, ids_keep), ids_restore)
    torch.testing.assert_close(res["mask"], mask)
    got, inp = patchify(res["reconstruction"], 4), patchify(x, 4)
    m = mask.bool()
    torch.testing.assert_close(got[m], pred[m])
    torch.testing.assert_close(got[~m], inp[~m])
    torch.testing.assert_close(patchify(res["prediction"], 4), pred)
    assert reconstruction.make(model, imgs, torch.tensor([0, 1, 2]), tmp_path) == tmp_path / "reconstruction.png"
    assert (tmp_path / "reconstruction.png").stat().st_size > 0
    assert reconstruction.make(Supervised(tiny_vit(), num_classes=3), imgs, torch.zeros(3), tmp_path / "x") is None


def test_confusion_matrix_and_probe(tmp_path: Path):
    from sklearn.metrics import confusion_matrix

    true, pred = np.array([0, 1, 2, 2, 1, 0, 2]), np.array([0, 2, 2, 1, 1, 0, 0])
    np.testing.assert_array_equal(confusion.matrix(true, pred, 4), confusion_matrix(true, pred, labels=range(4)))
    train, test = blobs(60, 0), blobs(30, 1)
    net = ARCHITECTURES.build("resnet", in_chans=1, image_size=12)
    from bigmodel.transfer.base import features
    from bigmodel.transfer.linear import Linear

    ref = Linear().fit_score(features(net, train), train.targets, features(net, test), test.targets)["top1"]
    true, pred = confusion.probe(net, train, test)
    assert 100.0 * float((true == pred).mean()) == pytest.approx(ref)
    path, counts = confusion.make(net, train, test, tmp_path, task="blobs")
    assert path == tmp_path / "confusion.png" and path.stat().st_size > 0
    assert counts.shape == (3, 3) and counts.sum(1).tolist() == [10, 10, 10]
    assert 100.0 * np.trace(counts) / 30 == pytest.approx(ref)


def test_tsne_map_pretrained_beside_twin(tmp_path: Path):
    test = blobs(45, 2)
    a, b = tiny_vit(0), tiny_vit(1)
    path, maps = embedding.make({"pretrained": a, "random init": b}, test, tmp_path, task="blobs")
    assert path == tmp_path / "tsne.png" and path.stat().st_size > 0
    assert list(maps) == ["pretrained", "random init"]
    assert maps["pretrained"].shape == (45, 2) and maps["random init"].shape == (45, 2)
    _, again = embedding.make({"same": a}, test, tmp_path, task="blobs")
    np.testing.assert_allclose(again["same"], maps["pretrained"], rtol=1e-5, atol=1e-4)  # seeded
    assert not np.allclose(maps["pretrained"], maps["random init"])


def test_curves(tmp_path: Path):
    metrics = [{"step": 2, "lr": 0.1, "loss": 3.0}, {"step": 4, "loss": 2.5}, {"step": 6, "lr": 0.05, "loss": 2.0}]
    assert curves.series(metrics, "lr") == ([2, 6], [0.1, 0.05])
    assert curves.series(metrics, "loss") == ([2, 4, 6], [3.0, 2.5, 2.0])
    assert curves.make(metrics, tmp_path) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert curves.make([{"step": 1, "lr": 0.1}], tmp_path / "none") is None


def test_monitor_figure_keeps_both_baselines_on_the_axes(monkeypatch):
    """The raw-pixel baseline above the whole curve (the quick start: pixels 98.44, curve ≤ 96) and the
    random-init one lie inside the y-range of both panels, clear of the frame (matplotlib's own margin
    put the pixel line 0.05 points under the top edge, hidden by it)."""
    from matplotlib.figure import Figure

    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k))[1])
    section = {"step": [0, 200, 400], "top1": [46.2, 90.2, 96.0], "pixels_top1": 98.44,
               "pretrain_flops": [0.0, 6.4e12, 1.28e13]}
    assert curves.monitor_png(section, "digits · knn").startswith(b"\x89PNG")
    for ax in drawn[0].axes:
        lo, hi = ax.get_ylim()  # clear of the frame by 2 % of the range, not on it
        assert 46.2 - lo > 0.02 * (hi - lo) and hi - 98.44 > 0.02 * (hi - lo)
        assert sorted(line.get_ydata()[0] for line in ax.get_lines()[1:]) == [46.2, 98.44]  # the two baselines


def test_model_figures_skips_missing_and_inapplicable_builders(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(figures, "BUILDERS", ("attention", "no_such_builder", "reconstruction"))
    model = Supervised(tiny_vit(), num_classes=3)
    written = figures.model_figures(model, images(2), torch.tensor([0, 1]), tmp_path)
    assert written == [tmp_path / "attention.png"]  # no module: skipped; not MAE: None
