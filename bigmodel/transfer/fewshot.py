"""Few-shot linear classification on frozen features (as in BiT, Kolesnikov et al., 2020, and
big_vision's few-shot evaluator): for each shot count k and each seed, exactly k training images per
class are drawn, a linear classifier is fitted on their features and scored on the whole test split.

Sampling: for seed s, each class's training indices are shuffled once by a generator seeded with s
and the first k are taken, so a seed's draws are nested (its 1-shot set is inside its 5-shot set)
and a (seed, k) pair always selects the same images.

Classifier: ``logistic`` is the linear probe's (standardised features, L2 logistic regression,
:class:`bigmodel.transfer.linear.Linear`); ``ridge`` is big_vision's closed form — least squares
onto ±1 class targets with an L2 penalty (scikit-learn's RidgeClassifier).

Result: ``per_shot[k] = {mean, std, runs}`` (top-1 % over seeds; std is the sample standard
deviation, 0 for one seed), and ``top1`` = the mean at the primary shot count (``primary``,
by default the largest k), so the protocol fills one cell of a suite's table.
"""

from __future__ import annotations

import statistics
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from sklearn.linear_model import RidgeClassifier

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol
from bigmodel.transfer.linear import Linear


def sample_shots(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of exactly ``k`` examples of every class present in ``labels`` (sorted by class)."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < k:
            raise ValueError(f"fewshot: class {c} has {len(idx)} training images, fewer than {k} shots")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(picked)


@PROTOCOLS.register("fewshot")
class FewShot(Protocol):
    """Args:
    shots: images per class, one experiment per value.
    seeds: number of draws (seeds 0..n-1) or the list of seeds.
    primary: the shot count reported as top1 (default: the largest).
    classifier: logistic (the linear probe's) or ridge (closed form, as big_vision).
    C: inverse L2 strength of the logistic classifier.
    alpha: L2 strength of the ridge classifier.
    """

    def __init__(
        self,
        shots: list[Annotated[int, Field(ge=1)]] = (1, 5, 10, 25),
        seeds: Annotated[int, Field(ge=1)] | list[int] = 5,
        primary: Annotated[int, Field(ge=1)] | None = None,
        classifier: Literal["logistic", "ridge"] = "logistic",
        C: Annotated[float, Field(gt=0)] = 1.0,
        alpha: Annotated[float, Field(gt=0)] = 1.0,
    ):
        self.shots = sorted(set(shots))
        if not self.shots:
            raise ValueError("fewshot: shots must name at least one shot count")
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        self.primary = max(self.shots) if primary is None else primary
        if self.primary not in self.shots:
            raise ValueError(f"fewshot: primary={primary} is not one of shots={self.shots}")
        self.classifier = classifier
        self.C = C
        self.alpha = alpha

    def _score(self, x_train, y_train, x_test, y_test) -> float:
        if self.classifier == "logistic":
            return Linear(C=self.C).fit_score(x_train, y_train, x_test, y_test)["top1"]
        clf = RidgeClassifier(alpha=self.alpha).fit(x_train.numpy(), y_train.numpy())
        pred = torch.from_numpy(clf.predict(x_test.numpy()))
        return 100.0 * (pred == y_test).float().mean().item()

    def check(self, targets: torch.Tensor) -> None:
        super().check(targets)
        classes, counts = targets[targets >= 0].unique(return_counts=True)
        smallest = int(counts.argmin())
        have = int(counts[smallest])
        if max(self.shots) > have:
            raise ValueError(f"shots = {self.shots}: {max(self.shots)} shots per class, but class "
                             f"{int(classes[smallest])} has only {have} training images; use shots <= {have}")

    def fit_score(self, x_train, y_train, x_test, y_test) -> dict[str, Any]:
        self.check(y_train)
        per_shot = {}
        for k in self.shots:
            runs = []
            for seed in self.seeds:
                idx = sample_shots(y_train, k, seed)
                runs.append(self._score(x_train[idx], y_train[idx], x_test, y_test))
            per_shot[k] = {"mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
                           "runs": runs}
        return {"top1": per_shot[self.primary]["mean"], "top1_std": per_shot[self.primary]["std"],
                "primary_shots": self.primary, "per_shot": per_shot}
