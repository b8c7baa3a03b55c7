"""SimCLR: NT-Xent against a naive per-pair reference, the batched augmentations, the objective."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.data import augment
from bigmodel.objectives.simclr import SimCLR, nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR eq. 1 written pair by pair: ℓ(i, j) = -log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ), averaged
    over both orders of every positive pair."""
    views = list(z1) + list(z2)
    n = len(z1)

    def sim(a, b):
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(sim(views[i], views[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(views[i], views[j]) / temperature) / denom)
    return torch.tensor(total / (2 * n), dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
def test_nt_xent_equals_naive_per_pair_computation(temperature):
    g = torch.Generator().manual_seed(int(temperature * 100))
    z1, z2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, temperature), naive_nt_xent(z1, z2, temperature))


def test_nt_xent_is_low_for_aligned_views_and_symmetric():
    z = torch.randn(16, 8)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(16, 8), 0.1)
    z2 = torch.randn(16, 8)
    torch.testing.assert_close(nt_xent(z, z2, 0.5), nt_xent(z2, z, 0.5))


def _images(c: int, n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(c), dtype=torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_deterministic_per_seed_and_differ(channels):
    obj = SimCLR(ResNet(depth=18, width=0.125, image_size=16, in_chans=channels))
    images = _images(channels)
    a1, a2 = obj.views(images, torch.Generator().manual_seed(3))
    b1, b2 = obj.views(images, torch.Generator().manual_seed(3))
    c1, _ = obj.views(images, torch.Generator().manual_seed(4))
    assert a1.shape == a2.shape == (6, channels, 16, 16)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, a2) and not torch.allclose(a1, c1)
    # with every augmentation switched off, both views are the plain normalised input
    plain = SimCLR(ResNet(depth=18, width=0.125, image_size=16, in_chans=channels), crop_scale=(1.0, 1.0),
                   crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    for view in plain.views(images, torch.Generator().manual_seed(3)):
        torch.testing.assert_close(view, plain.to_input(images))


def test_grey_data_on_an_rgb_backbone_stays_grey():
    obj = SimCLR(ResNet(depth=18, width=0.125, image_size=12, in_chans=3))
    v1, _ = obj.views(_images(1), torch.Generator().manual_seed(0))
    assert v1.shape == (6, 3, 12, 12) and torch.equal(v1[:, 0], v1[:, 1]) and torch.equal(v1[:, 0], v1[:, 2])


def test_augmentations_reduce_to_identity_when_switched_off():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    same = augment.random_resized_crop(x, 10, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x)
    mirrored = augment.random_resized_crop(x, 10, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    torch.testing.assert_close(mirrored, x.flip(-1))
    torch.testing.assert_close(augment.color_jitter(x, g, p=0.0), x)
    torch.testing.assert_close(augment.gaussian_blur(x, g, 5, p=0.0), x)
    assert torch.equal(augment.random_grayscale(x, g, p=0.0), x)
    grey = augment.random_grayscale(x, g, p=1.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_blur_and_hue_preserve_what_they_should():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 1, 9, 9), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, g, 5, sigma=(1.0, 2.0), p=1.0), flat)
    x = torch.rand(3, 2, 9, 9, generator=g)
    blurred = augment.gaussian_blur(x, g, 5, sigma=(1.5, 1.5), p=1.0)  # σ fixed: torchvision's blur
    torch.testing.assert_close(blurred, TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.5, 1.5]))
    greys = torch.rand(2, 1, 5, 5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(augment._hue_rotate(greys, torch.tensor([0.1, 0.4])), greys, atol=1e-5, rtol=0)
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(augment._hue_rotate(x, torch.tensor([0.0, 1.0])), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_forward_backward_step(arch):
    torch.manual_seed(0)
    net = (ResNet(depth=18, width=0.125, image_size=16, in_chans=1) if arch == "resnet"
           else ViT(size="nano", image_size=16, patch_size=4, in_chans=1))
    obj = SimCLR(net, proj_hidden=32, proj_dim=16)
    views = obj.views(_images(1, n=8), torch.Generator().manual_seed(0))
    out = obj(views, torch.full((8,), -1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    with torch.no_grad():  # pos_top1: the share of the 16 views whose most similar other view is their pair
        z = obj.head(obj.backbone(torch.cat(views)))
        z = z / z.norm(dim=1, keepdim=True)
        sim = [[float(z[i] @ z[k]) if k != i else -2.0 for k in range(16)] for i in range(16)]
        hits = sum(max(range(16), key=lambda k: sim[i][k]) == (i + 8) % 16 for i in range(16))
    assert out["pos_top1"].item() == hits / 16
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in obj.head.parameters())


# ---------------------------------------------------------------------------------------------
# Several processes: the negatives and the projection head's BatchNorm are those of the global batch


def _global_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    """A projection head (with BatchNorm) and backbone features of 4 images × 2 views."""
    from bigmodel.objectives.simclr import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 5, batch_norm=True)
    return head, torch.randn(2, 4, 6)  # (view, image, feature)


def _loss_and_grads(head: torch.nn.Module, feats: torch.Tensor) -> tuple[float, list[torch.Tensor], torch.Tensor]:
    """SimCLR.forward's computation on features: head over both views, gather, NT-Xent."""
    from bigmodel.train import distributed

    z1, z2 = head(torch.cat(list(feats))).chunk(2)
    loss = nt_xent(distributed.gather(z1), distributed.gather(z2), 0.5)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in head.parameters()], head[1].running_mean.clone()


def _rank_half(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from bigmodel.train import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    head, feats = _global_batch()
    with distributed.data_parallel(world):
        loss, grads, running = _loss_and_grads(head, feats[:, 2 * rank: 2 * rank + 2])  # this rank's 2 images
    for g in grads:  # what DDP does with the gradients
        dist.all_reduce(g)
        g /= world
    torch.save({"loss": loss, "grads": grads, "running_mean": running}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # a group of 2 processes; `make test-all`
def test_two_processes_see_the_loss_and_gradient_of_the_global_batch(tmp_path):
    """Each of 2 processes holds 2 of the 4 images; with the projections gathered (with gradients)
    and the BatchNorm statistics all-reduced, every rank's loss is the 1-process loss of the 4
    images, and the DDP average of the gradients is its gradient."""
    import torch.multiprocessing as mp

    from tests.train.dist_cases import free_port

    head, feats = _global_batch()
    loss, grads, running = _loss_and_grads(head, feats)
    mp.spawn(_rank_half, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        for a, b in zip(got["grads"], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["running_mean"], running)
    # without the gather a rank would contrast its own 2 images only: another loss
    alone, _, _ = _loss_and_grads(_global_batch()[0], feats[:, :2])
    assert abs(alone - loss) > 1e-2
