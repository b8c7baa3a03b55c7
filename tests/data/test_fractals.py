import numpy as np
import torch

from bigmodel.data.fractals import Fractals, sample_system


def test_same_seed_same_images_in_any_order() -> None:
    a = Fractals(classes=4, images_per_class=5, image_size=24, seed=3)
    b = Fractals(classes=4, images_per_class=5, image_size=24, seed=3)
    order = [19, 0, 7, 3]
    assert all(torch.equal(a[i][0], b[i][0]) for i in order)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_classes_and_seeds_differ() -> None:
    a = Fractals(classes=4, images_per_class=3, image_size=24, seed=0)
    b = Fractals(classes=4, images_per_class=3, image_size=24, seed=1)
    x, labels = torch.stack([a[i][0] for i in range(len(a))]).float(), a.labels()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    means = torch.stack([x[labels == c].mean(0) for c in range(4)])
    gaps = [round(float((means[c] - means[d]).abs().mean()), 3) for c in range(4) for d in range(c)]
    assert gaps == [44.172, 30.351, 38.388, 32.573, 51.047, 32.864]  # mean |Δ| of class means, 0..255 scale
    assert not torch.equal(a[0][0], b[0][0])  # seeds differ
    assert a.system(0)[0].shape != b.system(0)[0].shape or not np.allclose(a.system(0)[0], b.system(0)[0])


def test_images_are_non_trivial_and_splits_differ() -> None:
    train = Fractals(classes=3, images_per_class=4, image_size=32, channels=3)
    test = Fractals(classes=3, images_per_class=4, image_size=32, channels=3, split="test")
    img, label = train[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 1
    assert int((img > 0).sum()) == 390  # 12.7% of 3·32² values lit: an attractor, neither a dot nor a blank
    assert not torch.equal(train[0][0], test[0][0])
    assert train.system(0)[0].shape == test.system(0)[0].shape  # same classes in both splits


def test_maps_are_contractive() -> None:
    for c in range(10):
        A, _ = sample_system(np.random.default_rng([0, c, 0]))
        assert (np.linalg.norm(A, ord=2, axis=(-2, -1)) < 1).all()
