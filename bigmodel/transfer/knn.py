"""Weighted cosine k-nearest-neighbours on frozen features (Wu et al., 2018; as in DINO):
each of the k most similar training images votes for its class with weight exp(sim / T).

Features are centred on the training mean before the cosine (SimpleShot's "CL2N", Wang et al.,
2019): pooled transformer features share a large common component that otherwise makes every
pair look alike (on digits it moves a fractal-pretrained ViT's kNN from ~50% to ~74%)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol


def knn_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, k: int,
                temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class scores ``(N_test, num_classes)`` from ``(N, D)`` train and test features."""
    if k > len(x_train):
        raise ValueError(f"k = {k} is more than the {len(x_train)} training images; use k <= {len(x_train)}")
    train = F.normalize(x_train.float(), dim=1)
    scores = []
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
    center: subtract the training features' mean before the cosine.
    """

    def __init__(self, k: Annotated[int, Field(ge=1)] = 20, temperature: Annotated[float, Field(gt=0)] = 0.07,
                 center: bool = True):
        self.k = k
        self.temperature = temperature
        self.center = center

    def check(self, targets: torch.Tensor) -> None:
        super().check(targets)
        if self.k > len(targets):
            raise ValueError(f"k = {self.k} is more than the {len(targets)} training images; use k <= {len(targets)}")

    def fit_score(self, x_train, y_train, x_test, y_test) -> dict[str, float]:
        self.check(y_train)
        if self.center:
            mean = x_train.mean(0)
            x_train, x_test = x_train - mean, x_test - mean
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        pred = knn_predict(x_train, y_train, x_test, self.k, self.temperature, num_classes).argmax(1)
        return {"top1": 100.0 * (pred == y_test).float().mean().item()}
