"""Expert load of a V-MoE against a count by hand from the router logits."""

from __future__ import annotations

import torch

from bigmodel.analysis import expert_load
from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.objectives.base import Objective
from bigmodel.objectives.supervised import Supervised

E, K = 4, 2


def _model() -> Objective:
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=8, patch_size=4, in_chans=1,
              moe={"experts": E, "top_k": K, "every": 2, "capacity_factor": 0.5})
    for blk in net.moe_blocks:  # a router far from uniform, so the shares differ per expert
        torch.nn.init.normal_(net.vit.blocks[blk].mlp.router.weight, std=0.5)
    return Supervised(net, num_classes=3)


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)


def test_shares_equal_a_count_from_router_logits(monkeypatch):
    model = _model()
    monkeypatch.setattr(expert_load, "BATCH", 4)  # several batches: counts accumulate over them
    images, labels = _images(10), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2])
    logits: dict[int, list[torch.Tensor]] = {}
    blocks = model.backbone.moe_blocks
    assert blocks == [1, 3]
    handles = [model.backbone.vit.blocks[b].mlp.router.register_forward_hook(
        lambda m, a, out, b=b: logits.setdefault(b, []).append(out.detach().view(-1, 5, E)))  # 1 + 4 tokens
        for b in blocks]
    model.eval()
    with torch.no_grad():  # reference pass over all 10 images (eval: routing is per token)
        model.backbone(model.to_input(images))
    model.train()
    for h in handles:
        h.remove()
    load = expert_load.expert_load(model, images, labels)

    tokens = 10 * 5
    by_hand = torch.zeros(len(blocks), E, dtype=torch.float64)
    per_class = torch.zeros(3, E, dtype=torch.float64)
    for li, b in enumerate(blocks):
        z = torch.cat(logits[b])  # (10, 5, E): every image's tokens
        assert z.shape == (10, 5, E)
        for img in range(10):
            for tok in range(5):
                for e in z[img, tok].topk(K).indices.tolist():
                    by_hand[li, e] += 1 / (tokens * K)
                    if li == len(blocks) - 1 and labels[img] >= 0:
                        per_class[labels[img], e] += 1
    per_class /= torch.tensor([3, 3, 3])[:, None] * 5 * K  # 3 labelled images per class

    assert load.blocks == [1, 3] and load.classes == [0, 1, 2]
    assert load.shares.shape == (2, E) and load.class_shares.shape == (3, E)
    torch.testing.assert_close(load.shares, by_hand)
    torch.testing.assert_close(load.shares.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(load.class_shares, per_class)
    assert not torch.equal(load.shares[0], torch.full((E,), 1 / E, dtype=torch.float64))
    assert model.training  # mode restored (it ran in eval: no capacity drops)


def test_no_labels_gives_no_class_rows(tmp_path):
    load = expert_load.expert_load(_model(), _images(3), torch.full((3,), -1))
    assert load.classes == [] and load.class_shares.shape == (0, E)
    path = expert_load.make(_model(), _images(3), torch.full((3,), -1), tmp_path)
    assert path == tmp_path / "expert_load.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_writes_png_and_skips_dense_models(tmp_path):
    path = expert_load.make(_model(), _images(6), torch.tensor([0, 1, 2, 0, 1, 2]), tmp_path)
    assert path == tmp_path / "expert_load.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dense = Supervised(ViT(size="nano", image_size=8, patch_size=4, in_chans=1), num_classes=3)
    assert expert_load.make(dense, _images(3), torch.tensor([0, 1, 2]), tmp_path / "d") is None
    cnn = Objective(ResNet(depth=18, width=0.125, image_size=8, in_chans=1))
    assert expert_load.make(cnn, _images(3), torch.tensor([0, 1, 2]), tmp_path / "c") is None
    assert expert_load.expert_load(dense, _images(3), torch.tensor([0, 1, 2])) is None
