"""Linear probe: multinomial logistic regression (scikit-learn, L-BFGS) on frozen, standardised
features."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol


@PROTOCOLS.register("linear")
class Linear(Protocol):
    """Args:
    C: inverse L2 regularisation strength.
    max_iter: L-BFGS iterations.
    """

    def __init__(self, C: Annotated[float, Field(gt=0)] = 1.0, max_iter: Annotated[int, Field(ge=1)] = 1000):
        self.C = C
        self.max_iter = max_iter

    def fit_score(self, x_train, y_train, x_test, y_test) -> dict[str, float]:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))
        clf.fit(x_train.numpy(), y_train.numpy())
        pred = torch.from_numpy(clf.predict(x_test.numpy()))
        return {"top1": 100.0 * (pred == y_test).float().mean().item()}
