"""Few-shot linear classification on frozen features (as in BiT, Kolesnikov et al., 2020, and
big_vision's few-shot evaluator): for each shot count k and each seed, exactly k training images per
class are drawn, a linear classifier is fitted on their features and scored on the whole test split.

Sampling: for seed s, each class's training indices are shuffled once by a generator seeded with s
and the first k are taken, so a seed's draws are nested (its 1-shot set is inside its 5-shot set)
and a (seed, k) pair always selects the same images.

Classifier: ``logistic`` is the linear probe's (standardised features, L2 logistic regression,
:class:`bigmodel.transfer.linear.Linear`); ``ridge`` is big_vision's closed form — least squares
onto ±1 class targets with an L2 penalty (scikit-learn's RidgeClassifier).

Regularisation (``C: auto`` / ``alpha: auto``, the defaults) is chosen per draw from that draw's
shots alone — a few-shot classifier sees no other label. Logistic: stratified k-fold
cross-validation within the shots (``min(k, folds)`` folds, so up to ``folds`` shots each fold holds
out one image of every class: leave-one-out per class), the best mean validation log-loss over folds
(ties to the smallest C, as scikit-learn's ``GridSearchCV`` ranks them), then a refit on all k shots
with that C. Log-loss rather than top-1: a fold holds out a handful of images, on which top-1 ties
across most of the grid (and the tie goes to the most regularised C, which underfits), while a
proper score still tells the candidates apart. One shot leaves nothing to hold out, so 1-shot draws
take ``one_shot_C``. Ridge: scikit-learn's
``RidgeClassifierCV``, the efficient leave-one-out (generalised cross-validation) over ``alpha_grid``,
defined for every k. The chosen values are reported per run. A number for ``C`` / ``alpha`` skips the
search.

Result: ``per_shot[k] = {mean, std, runs, C | alpha}`` (top-1 % over seeds; std is the sample
standard deviation, 0 for one seed; the regularisation of each run), and ``top1`` = the mean at the
primary shot count (``primary``, by default the largest k), so the protocol fills one cell of a
suite's table; ``C`` (or ``alpha``) beside it lists that shot count's values.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol
from bigmodel.transfer.linear import C_GRID, Linear, best_C, val_scores

ALPHA_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


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
    C: inverse L2 strength of the logistic classifier, or ``auto``: chosen from ``C_grid`` by
        cross-validation within each draw's shots.
    C_grid: the candidates of ``C: auto``.
    folds: most folds of that cross-validation (``min(k, folds)`` are used).
    cv_scoring: what the folds score: ``log_loss`` (mean validation log-loss, lower is better) or
        ``top1``.
    one_shot_C: the C of 1-shot draws under ``C: auto`` (one image per class leaves none to hold out).
    alpha: L2 strength of the ridge classifier, or ``auto``: chosen from ``alpha_grid`` by
        leave-one-out within each draw's shots.
    alpha_grid: the candidates of ``alpha: auto``.
    """

    def __init__(
        self,
        shots: list[Annotated[int, Field(ge=1)]] = (1, 5, 10, 25),
        seeds: Annotated[int, Field(ge=1)] | list[int] = 5,
        primary: Annotated[int, Field(ge=1)] | None = None,
        classifier: Literal["logistic", "ridge"] = "logistic",
        C: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto",
        C_grid: Sequence[Annotated[float, Field(gt=0)]] = C_GRID,
        folds: Annotated[int, Field(ge=2)] = 5,
        cv_scoring: Literal["log_loss", "top1"] = "log_loss",
        one_shot_C: Annotated[float, Field(gt=0)] = 1.0,
        alpha: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto",
        alpha_grid: Sequence[Annotated[float, Field(gt=0)]] = ALPHA_GRID,
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
        self.C_grid = sorted({float(c) for c in C_grid})
        self.folds = folds
        self.cv_scoring = cv_scoring
        self.one_shot_C = one_shot_C
        self.alpha = alpha
        self.alpha_grid = sorted({float(a) for a in alpha_grid})
        if not self.C_grid or not self.alpha_grid:
            raise ValueError("fewshot: C_grid and alpha_grid must each name at least one value")

    def choose_C(self, x: np.ndarray, y: np.ndarray, k: int, seed: int) -> float:
        """The logistic classifier's C for one draw of ``k`` shots per class ``(N, D)``: cross-validated
        within the shots (stratified ``min(k, folds)``-fold, shuffled by ``seed``) on features
        standardised once with the shots' statistics."""
        if self.C != "auto":
            return float(self.C)
        if k == 1:
            return self.one_shot_C
        probe = Linear()  # the refit's solver settings
        x = StandardScaler().fit_transform(x)
        splits = StratifiedKFold(min(k, self.folds), shuffle=True, random_state=seed).split(x, y)
        per_fold = [val_scores(x[fit], y[fit], x[val], y[val], self.C_grid, probe.max_iter, probe.tol,
                               probe.solver, self.cv_scoring)[0] for fit, val in splits]
        return best_C(self.C_grid, np.mean(per_fold, axis=0).tolist())

    def _score(self, x_train, y_train, x_test, y_test, k: int, seed: int) -> tuple[float, float]:
        """Top-1 (%) of one draw and the regularisation it used (C or alpha)."""
        if self.classifier == "logistic":
            C = self.choose_C(x_train.numpy(), y_train.numpy(), k, seed)
            return Linear(C=C).fit_score(x_train, y_train, x_test, y_test)["top1"], C
        if self.alpha == "auto":
            clf = RidgeClassifierCV(alphas=self.alpha_grid).fit(x_train.numpy(), y_train.numpy())
            alpha = float(clf.alpha_)
        else:
            alpha = float(self.alpha)
            clf = RidgeClassifier(alpha=alpha).fit(x_train.numpy(), y_train.numpy())
        pred = torch.from_numpy(clf.predict(x_test.numpy()))
        return 100.0 * (pred == y_test).float().mean().item(), alpha

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
        reg = "C" if self.classifier == "logistic" else "alpha"
        for k in self.shots:
            runs, chosen = [], []
            for seed in self.seeds:
                idx = sample_shots(y_train, k, seed)
                top1, value = self._score(x_train[idx], y_train[idx], x_test, y_test, k, seed)
                runs.append(top1)
                chosen.append(value)
            per_shot[k] = {"mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
                           "runs": runs, reg: chosen}
        return {"top1": per_shot[self.primary]["mean"], "top1_std": per_shot[self.primary]["std"],
                "primary_shots": self.primary, reg: per_shot[self.primary][reg], "per_shot": per_shot}
