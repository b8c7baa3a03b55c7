"""FLOPs against hand-computed counts (2 FLOPs per multiply-accumulate of matmuls and convolutions).

Notation: ``mm(m, k, n) = 2·m·k·n``, an ``(m, k) @ (k, n)`` product.
"""

from __future__ import annotations

import torch

from bigmodel.analysis.flops import forward_flops, summary, train_step_flops
from bigmodel.architectures.igpt import IGPT
from bigmodel.architectures.lstm import LSTM
from bigmodel.architectures.vit import ViT
from bigmodel.objectives.simclr import SimCLR
from bigmodel.objectives.supervised import Supervised


def mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def lstm_layer(steps: int, inp: int, hidden: int) -> int:
    """One LSTM layer-direction over ``steps`` inputs: 4 gates, ``2·4·(in·h + h·h)·T``."""
    return 2 * 4 * (inp * hidden + hidden * hidden) * steps


# LSTM(image 8, patch 4, 1 channel, hidden 6, 2 bidirectional layers): T = 4 patches of 16 pixels.
PATCH_EMBED = mm(4, 16, 6)  # conv 4x4/4, 1 → 6 channels, at 4 positions
LSTM_LAYERS = 2 * lstm_layer(4, 6, 6) + 2 * lstm_layer(4, 12, 6)  # layer 2 reads both directions (12)


def _lstm() -> LSTM:
    torch.manual_seed(0)
    return LSTM(image_size=8, patch_size=4, in_chans=1, hidden=6, layers=2)


def vit_block(tokens: int, width: int, heads: int, mlp: int) -> int:
    """qkv, attention (QKᵀ and AV per head), projection, two MLP layers."""
    d = width // heads
    attention = heads * (mm(tokens, d, tokens) + mm(tokens, tokens, d))
    return mm(tokens, width, 3 * width) + attention + mm(tokens, width, width) + 2 * mm(tokens, width, mlp)


def test_lstm_forward_counts_every_layer_and_direction() -> None:
    """FlopCounterMode alone counts only the patch embedding (the LSTM kernel has no formula)."""
    assert PATCH_EMBED + LSTM_LAYERS == 12288
    assert forward_flops(_lstm()) == PATCH_EMBED + LSTM_LAYERS


def test_vit_forward_counts_patch_embed_blocks_and_cpu_attention() -> None:
    """ViT-nano (width 96, depth 4, 3 heads, MLP 384) on 16 px, patch 4, grey: 16 patches + class token."""
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=1)
    expected = mm(16, 16, 96) + 4 * vit_block(17, 96, 3, 384)
    assert forward_flops(net) == expected == 15_533_568


def test_vmoe_forward_counts_top_k_experts_per_token() -> None:
    """Blocks 2 and 4 are MoE (every 2): a router, and each of the 17 tokens through its top_k=2
    experts (each an MLP of the dense size), whatever the capacity factor."""
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=1,
              moe={"experts": 4, "top_k": 2, "every": 2, "capacity_factor": 0.5})
    dense = vit_block(17, 96, 3, 384)
    moe = dense - 2 * mm(17, 96, 384) + mm(17, 96, 4) + 2 * 2 * mm(17, 96, 384)
    assert forward_flops(net) == mm(16, 16, 96) + 2 * dense + 2 * moe


def test_igpt_forward_counts_all_blocks_not_only_the_feature_layers() -> None:
    """iGPT-tiny (width 64, depth 4, 4 heads) on 4x4 grey: 16 tokens; features read 2 blocks, the
    model has 4; plus the palette lookup (distances to 8 colours)."""
    torch.manual_seed(0)
    net = IGPT(size="tiny", image_size=4, in_chans=1, colours=8)
    assert net.feature_layer == 2
    assert forward_flops(net) == mm(16, 1, 8) + 4 * vit_block(16, 64, 4, 256)


def test_supervised_train_step_is_forward_plus_backward() -> None:
    """Backward of a layer: input gradient + weight gradient, each the forward's cost; the first
    layer (patch embedding) needs no input gradient; an LSTM layer's backward is 2x its forward."""
    net = _lstm()
    obj = Supervised(net, num_classes=5)
    b, feat = 3, 12
    x, y = torch.randn(b, 1, 8, 8), torch.tensor([0, 1, 2])
    head = mm(b, feat, 5)
    expected = 2 * b * PATCH_EMBED + 3 * b * LSTM_LAYERS + 3 * head
    assert train_step_flops(obj, [x], y) == expected
    assert all(p.grad is None for p in obj.parameters())  # side-effect free


def test_simclr_train_step_counts_both_views_head_and_similarities() -> None:
    """Two views of 3 images through the backbone (6 images), the projection head (12 → 7, BN, → 5;
    first layer without bias), NT-Xent's 6x6 similarity matrix (+ backward) and the no-grad
    positive-accuracy similarities."""
    net = _lstm()
    obj = SimCLR(net, proj_hidden=7, proj_dim=5)
    x = torch.randn(3, 1, 8, 8)
    n = 6
    expected = (2 * n * PATCH_EMBED + 3 * n * LSTM_LAYERS + 3 * mm(n, 12, 7) + 3 * mm(n, 7, 5)
                + 3 * mm(n, 5, n) + mm(n, 5, n))
    assert train_step_flops(obj, [x, x.flip(-1)], torch.zeros(3, dtype=torch.long)) == expected


def test_summary_reports_gflops() -> None:
    obj = Supervised(_lstm(), num_classes=5)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    assert summary(obj, [x], y) == {"forward_gflops_per_image": round(12288 / 1e9, 6),
                                    "train_gflops_per_step": round(train_step_flops(obj, [x], y) / 1e9, 4),
                                    "train_images_per_step": 3}


def test_counting_a_train_step_leaves_every_weight_buffer_and_gradient_as_it_was() -> None:
    """SimCLR's projector has BatchNorm: a training-mode forward updates its running statistics,
    which the old count left changed in the trained objective (report.json ≠ its checkpoint)."""
    obj = SimCLR(_lstm(), proj_hidden=7, proj_dim=5)
    before = {k: v.clone() for k, v in obj.state_dict().items()}
    assert any("running_mean" in k for k in before)
    x = torch.randn(3, 1, 8, 8)
    obj.eval()
    train_step_flops(obj, [x, x.flip(-1)], torch.zeros(3, dtype=torch.long), accum_steps=1)
    after = obj.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in obj.parameters()) and not obj.training


def test_a_run_of_several_processes_is_counted_one_rank_micro_batch_at_a_time(monkeypatch) -> None:
    """After DDP the count ran the whole global batch in rank 0's memory; :func:`for_run` now cuts it
    into the ``accum_steps · world`` pieces the ranks ran (SimCLR: each piece's own similarities)."""
    from types import SimpleNamespace

    from bigmodel.analysis.flops import for_run
    from bigmodel.data.base import TensorImages

    data = TensorImages(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    recipe = SimpleNamespace(optim=SimpleNamespace(batch_size=8, accum_steps=2), run=SimpleNamespace(seed=0))
    obj = SimCLR(_lstm(), proj_hidden=7, proj_dim=5)
    n = 2 * 8 // 4  # two views of each rank's micro-batch of 2 images
    piece = 2 * n * PATCH_EMBED + 3 * n * LSTM_LAYERS + 3 * mm(n, 12, 7) + 3 * mm(n, 7, 5) + 4 * mm(n, 5, n)
    from bigmodel.analysis import flops

    seen = []
    monkeypatch.setattr(flops, "summary", lambda o, views, labels, accum: seen.append((views, labels, accum)) or {})
    for_run(recipe, data, obj, world=2)
    ((views, labels, accum),) = seen
    assert accum == 4 and [tuple(v.shape) for v in views] == [(8, 1, 8, 8)] * 2 and len(labels) == 8
    assert train_step_flops(obj, views, labels, accum) == 4 * piece


BN_RESNET = ("{name: timm, model: resnet10t, image_size: 16, in_chans: 1, "
             "model_kwargs: {channels: [8, 16, 16, 16], stem_width: 8}}")


def test_report_rows_of_a_batchnorm_backbone_equal_transfer_of_its_checkpoint(tmp_path) -> None:
    """Issue 17: the FLOPs count ran a training step on the trained model before transfer, moving
    its BatchNorm statistics away from the checkpoint's; the report's rows now are exactly what
    ``bigmodel transfer RUN`` scores from that checkpoint."""
    from rich.console import Console

    from bigmodel import api
    from bigmodel.recipe import resolve

    out = tmp_path / "bn"
    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={out}", f"architecture={BN_RESNET}",
                                    "data.image_size=16", "optim.steps=2", "run.precision=fp32",
                                    "transfer=[{task: digits, protocol: knn, k: 5}]"])
    report = api.run_pipeline(recipe, Console(quiet=True))
    assert report["model"]["train_gflops_per_step"] > 0
    again = api.score_checkpoint(out, console=Console(quiet=True))
    scored = [{k: v for k, v in row["results"]["pretrained"].items() if k != "seconds"} for row in again]
    reported = [{k: v for k, v in row["results"]["pretrained"].items() if k != "seconds"} for row in report["transfer"]]
    assert scored == reported
