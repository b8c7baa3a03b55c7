"""Weighted cosine k-nearest-neighbours on frozen features (Wu et al., 2018; as in DINO):
each of the k most similar training images votes for its class with weight exp(sim / T)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol


def knn_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``(N_test, num_classes)``."""
    train = F.normalize(x_train.float(), dim=1)
    scores = []
    k = min(k, len(train))
    for i in range(0, len(x_test), chunk):
        sim = F.normalize(x_test[i:i + chunk].float(), dim=1) @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, y_train[idx], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


@PROTOCOLS.register("knn")
class KNN(Protocol):
    """Args:
    k: neighbours.
    temperature: softness of the similarity weights.
    """

    def __init__(self, k: Annotated[int, Field(ge=1)] = 20, temperature: Annotated[float, Field(gt=0)] = 0.07):
        self.k = k
        self.temperature = temperature

    def fit_score(self, x_train, y_train, x_test, y_test) -> dict[str, float]:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        pred = knn_predict(x_train, y_train, x_test, self.k, self.temperature, num_classes).argmax(1)
        return {"top1": 100.0 * (pred == y_test).float().mean().item()}
