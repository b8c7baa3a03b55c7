"""Linear probe: multinomial logistic regression (scikit-learn) on frozen features, standardised
with the training split's mean and variance, its L2 strength chosen on a validation split.

Choosing C (``C: auto``, the default), as the linear evaluations of SimCLR (Chen et al., 2020) and
BiT (Kolesnikov et al., 2020) do: a stratified validation split is carved from the training images
(:func:`validation_split`: ``val_fraction`` of every class, deterministic by ``val_seed``), the
classifier is fitted on the rest for every C of a log grid (``C_grid``, 10^-4..10^2 by default) and
scored (top-1) on the held-out part; the best C (ties: the smallest, the strongest regularisation)
is refitted on all training images, so the result equals the probe with that C fixed (a best C at
either end of the grid is announced in one line: the optimum may lie beyond it). Every subject
(pretrained, twin, pixels) goes through the same search, so the columns stay comparable. The
features are standardised once (with the whole training split's statistics, no labels involved) and
reused by every fit; the grid is walked from strong to weak regularisation, each fit starting from
the previous one's weights (scikit-learn's ``warm_start``). A number for ``C`` skips the search.

Solver: Newton-CG by default. Raw pixels are badly conditioned (thousands of strongly correlated
features, weak L2): L-BFGS can stop unconverged at its iteration limit where Newton-CG reaches
scikit-learn's tolerance in a few dozen iterations.

Convergence is checked, not assumed: scikit-learn's ``ConvergenceWarning`` (with its URLs) never
reaches the user's output. A fit that stops at ``max_iter`` is scored all the same, marked
``converged: false`` in its result, and announced by one short line.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _fit(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> bool:
    """``clf.fit(x, y)``; returns whether the solver converged. Warnings other than
    ``ConvergenceWarning`` pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(x, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return converged


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, C: float, max_iter: int, tol: float,
              solver: str) -> tuple[StandardScaler, LogisticRegression, bool]:
    """Fit the scaler (on ``x_train`` only) and the classifier with a fixed ``C`` on ``(N, D)``
    features; returns them and whether the solver converged."""
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol, solver=solver)
    return scaler, clf, _fit(clf, scaler.transform(x_train), y_train)


def validation_split(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified hold-out: a boolean mask ``(N,)`` of the validation images. Every class with at
    least two images gives ``round(fraction · n_c)`` of them (at least one, and never all: one stays
    for fitting); a class with one image stays whole in the fitting part. Each class's indices are
    permuted by one generator seeded with ``seed``, classes in sorted order, so the same labels and
    seed give the same split."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        mask[rng.permutation(idx)[:take]] = True
    return mask


def val_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               grid: list[float], max_iter: int, tol: float, solver: str,
               scoring: Literal["top1", "log_loss"] = "top1") -> tuple[list[float], bool]:
    """Validation score of a classifier fitted on standardised ``x_fit`` for every C of the
    ascending ``grid``, each fit warm-started from the previous one; and whether all converged.
    The score is top-1 (%) or the negated mean log-loss (higher is better either way; scikit-learn's
    ``accuracy`` and ``neg_log_loss`` scorers)."""
    clf = LogisticRegression(max_iter=max_iter, tol=tol, solver=solver, warm_start=True)
    scores, converged = [], True
    for c in grid:
        clf.set_params(C=c)
        converged &= _fit(clf, x_fit, y_fit)
        if scoring == "top1":
            scores.append(100.0 * float((clf.predict(x_val) == y_val).mean()))
        else:
            scores.append(-float(log_loss(y_val, clf.predict_proba(x_val), labels=clf.classes_)))
    return scores, converged


def best_C(grid: list[float], scores: list[float]) -> float:
    """The C of the best score; ties go to the first (smallest) C, as scikit-learn's ``GridSearchCV``
    ranks them."""
    return grid[int(np.argmax(scores))]


@PROTOCOLS.register("linear")
class Linear(Protocol):
    """Args:
    C: inverse L2 regularisation strength (scikit-learn's, on the summed loss), or ``auto``: chosen
        from ``C_grid`` on a validation split of the training images, then refitted on all of them.
    C_grid: the candidates of ``C: auto`` (searched in ascending order).
    val_fraction: share of every class's training images held out to choose C.
    val_seed: seed of that split.
    max_iter: solver iterations.
    tol: the solver's stopping tolerance.
    solver: ``newton-cg`` or ``lbfgs`` (scikit-learn's multinomial solvers that fit in memory for
        thousands of features).
    """

    def __init__(self, C: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto",
                 C_grid: Sequence[Annotated[float, Field(gt=0)]] = C_GRID,
                 val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2, val_seed: int = 0,
                 max_iter: Annotated[int, Field(ge=1)] = 1000, tol: Annotated[float, Field(gt=0)] = 1e-4,
                 solver: Literal["newton-cg", "lbfgs"] = "newton-cg"):
        self.C = C
        self.C_grid = sorted({float(c) for c in C_grid})
        if not self.C_grid:
            raise ValueError("linear: C_grid must name at least one C")
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver

    def check(self, targets: torch.Tensor) -> None:
        super().check(targets)
        if self.C == "auto" and int(targets[targets >= 0].bincount().max()) < 2:
            raise ValueError("linear: C = auto holds out training images to choose C, but no class has 2 "
                             "training images; set C to a number")

    def search(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Choose C on standardised features ``x`` ``(N, D)``: ``{"C", "grid", "val_top1" (per C),
        "val_images", "converged"}``."""
        val = validation_split(y, self.val_fraction, self.val_seed)
        if val.all() or not val.any() or len(np.unique(y[~val])) < 2:
            raise ValueError("linear: C = auto needs a validation split with 2 classes left to fit on; "
                             "set C to a number")
        scores, converged = val_scores(x[~val], y[~val], x[val], y[val], self.C_grid, self.max_iter, self.tol,
                                       self.solver)
        return {"C": best_C(self.C_grid, scores), "grid": self.C_grid, "val_top1": scores,
                "val_images": int(val.sum()), "converged": converged}

    def fit(self, x_train: np.ndarray,
            y_train: np.ndarray) -> tuple[StandardScaler, LogisticRegression, dict[str, Any]]:
        """Standardise, choose C (``auto``) and fit on all of ``x_train`` ``(N, D)``; returns the
        scaler, the classifier and ``{"C", "converged", "iterations"[, "C_search"]}``."""
        scaler = StandardScaler().fit(x_train)
        x = scaler.transform(x_train)
        info: dict[str, Any] = {}
        if self.C == "auto":
            info["C_search"] = self.search(x, y_train)
            C = info["C_search"]["C"]
        else:
            C = float(self.C)
        clf = LogisticRegression(C=C, max_iter=self.max_iter, tol=self.tol, solver=self.solver)
        info = {"C": C, "converged": _fit(clf, x, y_train), "iterations": int(np.max(clf.n_iter_)), **info}
        return scaler, clf, info

    def fit_score(self, x_train, y_train, x_test, y_test) -> dict[str, Any]:
        scaler, clf, info = self.fit(x_train.numpy(), y_train.numpy())
        pred = torch.from_numpy(clf.predict(scaler.transform(x_test.numpy())))
        if not info["converged"]:
            print(f"linear probe: {self.solver} did not converge in {info['iterations']} iterations (result marked "
                  f"converged: false); raise the protocol's max_iter", file=sys.stderr)
        elif "C_search" in info and not info["C_search"]["converged"]:
            print(f"linear probe: a fit of the C search did not converge in {self.max_iter} iterations (the chosen "
                  f"C may differ); raise the protocol's max_iter", file=sys.stderr)
        if "C_search" in info and len(self.C_grid) > 1 and info["C"] in (self.C_grid[0], self.C_grid[-1]):
            side = "smallest" if info["C"] == self.C_grid[0] else "largest"
            print(f"linear probe: the chosen C = {info['C']:g} is the C_grid's {side}; a wider C_grid may score higher",
                  file=sys.stderr)
        return {"top1": 100.0 * (pred == y_test).float().mean().item(), **info}
