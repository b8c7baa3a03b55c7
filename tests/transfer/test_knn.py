"""kNN: weighted cosine votes against a naive reference; k above the training images is an error
naming k, its value and the limit, never a silent clamp."""

from __future__ import annotations

import math

import pytest
import torch

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.knn import KNN, knn_predict


def _naive(x_train, y_train, x_test, k, temperature, num_classes):
    """Per test image: cosine to every training image, the k largest vote exp(sim / T) for their class."""
    out = []
    for q in x_test.tolist():
        sims = []
        for t, y in zip(x_train.tolist(), y_train.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(q, t, strict=True))
            sims.append((dot / (math.hypot(*q) * math.hypot(*t)), y))
        votes = [0.0] * num_classes
        for sim, y in sorted(sims, reverse=True)[:k]:
            votes[y] += math.exp(sim / temperature)
        out.append(votes)
    return torch.tensor(out)


def test_knn_predict_matches_the_naive_reference():
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(30, 6, generator=g), torch.randn(7, 6, generator=g)
    y_train = torch.randint(0, 3, (30,), generator=g)
    got = knn_predict(x_train, y_train, x_test, k=5, temperature=0.5, num_classes=3, chunk=3)
    assert torch.allclose(got, _naive(x_train, y_train, x_test, 5, 0.5, 3), rtol=1e-5)


def test_k_equal_to_the_training_set_is_allowed_and_one_more_is_not():
    x, y = torch.eye(4), torch.tensor([0, 1, 0, 1])
    # centred one-hot rows: cosine 1 to itself, -1/3 to the others, so its own class always wins
    assert KNN(k=4).fit_score(x, y, x, y)["top1"] == 100.0
    with pytest.raises(ValueError) as err:
        KNN(k=5).fit_score(x, y, x, y)
    assert str(err.value) == "k = 5 is more than the 4 training images; use k <= 4"
    with pytest.raises(ValueError, match="k = 5 is more than the 4 training images"):
        knn_predict(x, y, x, 5, 0.07, 2)


@pytest.mark.parametrize("targets, message", [
    (torch.zeros(10, dtype=torch.long),
     "the task's training split has only class 0; a transfer protocol needs at least 2 classes"),
    (torch.full((10,), -1), "the task's training split has no labelled images; transfer needs class labels"),
])
def test_a_task_with_one_class_or_no_labels_is_refused(targets, message):
    protocol = PROTOCOLS.build("knn", **PROTOCOLS.validate("knn", {"k": 3}))
    with pytest.raises(ValueError) as err:
        protocol.check(targets)
    assert str(err.value) == message
