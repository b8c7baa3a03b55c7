"""The frozen-feature protocols alone, against references written directly with scikit-learn and
numpy on a fixed feature set (a seeded random MLP's features of the digits images): same data,
same computation, so the same number of correct test predictions, exactly.

The references read the protocol's recorded ``settings()``, so a change of solver or default that
the protocol reports is followed here; a setting the reference does not know fails the test until
the reference learns it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.preprocessing import StandardScaler

from bigmodel.data.digits import digits
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import features
from bigmodel.transfer.linear import validation_split
from tests.transfer.conftest import TinyMLP

SEARCH = {"C_grid", "val_fraction", "val_seed"}  # the settings of C: auto, not LogisticRegression's


def feature_set(shift_test: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits through a seeded random MLP: float32 ``(1347, 32)`` train and ``(450, 32)`` test
    features with their labels. ``shift_test`` moves every test feature by that many train
    standard deviations (a scaler fitted on test data would undo it)."""
    net = TinyMLP(seed=0)
    train, test = digits(split="train"), digits(split="test")
    x_tr, x_te = features(net, train).numpy(), features(net, test).numpy()
    x_te = x_te + shift_test * x_tr.std(0, keepdims=True)
    return x_tr, train.targets.numpy(), x_te.astype(np.float32), test.targets.numpy()


def reference_linear(settings: dict, x_tr, y_tr, x_te, y_te) -> int:
    """Correct test predictions of a scaler fitted on the train features only, then an L2
    multinomial logistic regression with the protocol's settings; ``C: auto`` is scikit-learn's
    GridSearchCV (accuracy) on the protocol's validation split of the standardised train features,
    refitted on all of them with the best C."""
    lr_params = set(LogisticRegression().get_params())
    unknown = set(settings) - lr_params - SEARCH
    assert not unknown, f"the reference does not know the linear probe's settings {sorted(unknown)}: teach it"
    settings = dict(settings)
    grid, fraction, seed = (settings.pop(k) for k in ("C_grid", "val_fraction", "val_seed"))
    scaler = StandardScaler().fit(x_tr)
    if settings["C"] == "auto":
        val = validation_split(y_tr, fraction, seed)
        search = GridSearchCV(LogisticRegression(**{k: v for k, v in settings.items() if k != "C"}), {"C": grid},
                              scoring="accuracy", cv=PredefinedSplit(np.where(val, 0, -1)), refit=False)
        settings["C"] = search.fit(scaler.transform(x_tr), y_tr).best_params_["C"]
    clf = LogisticRegression(**settings).fit(scaler.transform(x_tr), y_tr)
    return int((clf.predict(scaler.transform(x_te)) == y_te).sum())


def reference_knn(settings: dict, x_tr, y_tr, x_te, y_te) -> int:
    """Correct test predictions of a weighted cosine kNN written in numpy: optionally centre on the
    train mean, L2-normalise, take the k most similar train images, each voting exp(sim / T)."""
    assert set(settings) == {"k", "temperature", "center"}, f"unknown kNN settings {settings}: teach the reference"
    x_tr, x_te = x_tr.astype(np.float64), x_te.astype(np.float64)
    if settings["center"]:
        mean = x_tr.mean(0)
        x_tr, x_te = x_tr - mean, x_te - mean
    x_tr = x_tr / np.maximum(np.linalg.norm(x_tr, axis=1, keepdims=True), 1e-12)
    x_te = x_te / np.maximum(np.linalg.norm(x_te, axis=1, keepdims=True), 1e-12)
    sim = x_te @ x_tr.T
    k = min(settings["k"], len(x_tr))
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sim, idx, 1) / settings["temperature"])
    votes = np.zeros((len(x_te), int(max(y_tr.max(), y_te.max())) + 1))
    np.add.at(votes, (np.arange(len(x_te))[:, None], y_tr[idx]), weights)
    return int((votes.argmax(1) == y_te).sum())


REFERENCES = {"linear": reference_linear, "knn": reference_knn}
CASES = [
    ("linear", {}, 0.0),
    ("linear", {"C": 0.05}, 0.0),
    ("linear", {}, 3.0),  # a scaler fitted on train only leaves the shifted test features shifted
    ("knn", {}, 0.0),
    ("knn", {"k": 1}, 0.0),
    ("knn", {"k": 7, "temperature": 0.5, "center": False}, 0.0),
    ("knn", {"k": 20}, 3.0),  # centred on the train mean only
]


@pytest.mark.parametrize("name, kwargs, shift", CASES, ids=[f"{n}-{k}-shift{s}" for n, k, s in CASES])
def test_protocol_equals_its_reference(name: str, kwargs: dict, shift: float) -> None:
    x_tr, y_tr, x_te, y_te = feature_set(shift)
    protocol = PROTOCOLS.build(name, **kwargs)
    expected = REFERENCES[name](protocol.settings(), x_tr, y_tr, x_te, y_te)
    top1 = protocol.fit_score(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                              torch.from_numpy(y_te))["top1"]
    assert round(top1 * len(y_te) / 100) == expected  # the same test images right, to the image
    assert top1 == pytest.approx(100 * expected / len(y_te), abs=1e-4)  # float32 mean vs exact ratio


def test_feature_set_is_the_fixed_one() -> None:
    """The references are only as strong as the data: pin its shape and a checksum of its values."""
    x_tr, y_tr, x_te, y_te = feature_set()
    assert x_tr.shape == (1347, 32) and x_te.shape == (450, 32)
    assert np.bincount(y_te).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
    assert float(x_tr.sum(dtype=np.float64)) == pytest.approx(8602.4713, rel=1e-6)
