"""The step-indexed loader (map-style path unchanged, streamed path dealt to workers), each rank's
rows of the global batch, and the batched augmentations."""

from __future__ import annotations

import pytest
import torch

from bigmodel.data.augment import random_resized_crop
from bigmodel.data.base import TensorImages
from bigmodel.data.fractals import Fractals
from bigmodel.data.loader import _Steps, batches, rank_rows, rank_world
from bigmodel.data.transforms import random_crop_flip


def _tensor_set(n: int = 50) -> TensorImages:
    idx = torch.arange(n)
    return TensorImages(idx.to(torch.uint8)[:, None, None, None].expand(n, 1, 4, 4).contiguous(), idx)


def test_map_style_batches_are_a_function_of_the_step():
    ds = _tensor_set()
    whole = [y.tolist() for _, y in batches(ds, 8, seed=1, start=0, stop=14)]
    resumed = [y.tolist() for _, y in batches(ds, 8, seed=1, start=6, stop=14)]
    assert resumed == whole[6:]
    epoch = [i for b in whole[:6] for i in b] + whole[6][:2]  # 50 samples = 6 batches + 2
    assert sorted(epoch) == list(range(50))


def test_map_style_workers_give_the_same_batches():
    ds = Fractals(classes=3, images_per_class=4, image_size=8, points=500)
    inline = [y for _, y in batches(ds, 4, seed=0, stop=4)]
    workers = [y for _, y in batches(ds, 4, seed=0, stop=4, num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(inline, workers, strict=True))


def test_rank_rows_are_each_ranks_share_of_every_micro_batch():
    assert rank_rows(8).tolist() == list(range(8))
    assert rank_rows(8, 1, 1, 2).tolist() == [4, 5, 6, 7]
    assert rank_rows(8, 2, 0, 2).tolist() == [0, 1, 4, 5]  # micro-batches [0..3], [4..7]: first half of each
    assert rank_rows(8, 2, 1, 2).tolist() == [2, 3, 6, 7]
    assert sorted(r for k in range(4) for r in rank_rows(16, 2, k, 4).tolist()) == list(range(16))
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        rank_rows(8, 1, 0, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_read_their_rows_of_the_one_global_batch(workers: int):
    """The batch of a step does not depend on the process count: 2 ranks together read it."""
    ds = Fractals(classes=3, images_per_class=4, image_size=8, points=500) if workers else _tensor_set()
    whole = [y for _, y in batches(ds, 8, seed=1, stop=5, num_workers=workers, accum_steps=2)]
    ranks = [[y for _, y in batches(ds, 8, seed=1, stop=5, num_workers=workers, rank=r, world=2, accum_steps=2)]
             for r in range(2)]
    for step, y in enumerate(whole):
        together = torch.empty_like(y)
        for r in range(2):
            together[rank_rows(8, 2, r, 2)] = ranks[r][step]
        assert torch.equal(together, y)


class _Echo:
    """A streamed dataset whose batch for step t is [t]."""

    streams = 4

    def workers_for(self, n: int) -> int:
        return max(w for w in range(1, n + 1) if self.streams % w == 0)

    def step_batches(self, steps, batch_size, seed, rank=0, world=1, accum_steps=1):
        for t in steps:
            yield torch.zeros(1, 1, 1, 1, dtype=torch.uint8), torch.tensor([t])


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_streamed_steps_come_back_in_order_from_any_worker_count(workers: int):
    got = [int(y) for _, y in batches(_Echo(), 1, seed=0, start=5, stop=12, num_workers=workers)]
    assert got == list(range(5, 12))
    assert _Echo().workers_for(3) == 2  # 3 workers would split 4 streams unevenly


def test_steps_of_one_worker():
    steps = _Steps(_Echo(), 1, 0, start=5, stop=12, workers=2, rank=0, world=1)
    assert [int(y) for _, y in steps] == list(range(5, 12, 2))  # worker 0 (main process) serves every other


def test_rank_world_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_world() == (3, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_world() == (0, 1)


def test_random_resized_crop_matches_its_definition():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(6, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_resized_crop(x, 8, g, scale=(1, 1), ratio=(1, 1)), x)
    flipped = random_resized_crop(x, 8, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), flip_prob=0.5)
    assert all(torch.equal(f, s) or torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x, strict=True))
    y = random_resized_crop(x, 5, g, scale=(0.1, 0.5), flip_prob=0.5)
    assert y.shape == (6, 3, 5, 5) and y.min() >= 0 and y.max() <= 63
    # a crop of half the width and height (area 1/4) covers a quarter of the image's span
    q = random_resized_crop(x, 8, g, scale=(0.25, 0.25), ratio=(1, 1))
    span_rows = (q[:, 0, -1, 0] - q[:, 0, 0, 0]) / 8
    assert torch.allclose(span_rows, torch.full((6,), 3.5), atol=1e-4)


def test_augmentations_are_reproducible_from_the_generator():
    x = torch.rand(4, 3, 12, 12)
    for aug in (lambda g: random_resized_crop(x, 10, g, flip_prob=0.5), lambda g: random_crop_flip(x, g)):
        a, b = aug(torch.Generator().manual_seed(7)), aug(torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and not torch.equal(a, aug(torch.Generator().manual_seed(8)))
