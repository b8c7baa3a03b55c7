"""The linear probe: scikit-learn's logistic regression on train-standardised features, C chosen on
a stratified validation split (checked against scikit-learn's GridSearchCV on the same split), with
convergence checked and library warnings kept out of the user's output."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.preprocessing import StandardScaler

import bigmodel.transfer.linear as linear
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.linear import Linear, validation_split


def _features() -> tuple[torch.Tensor, ...]:
    """Digits (64 pixel features): 1000 training, 797 test images, the test split shifted so that a
    scaler fitted on all images would differ from one fitted on the training images."""
    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy(x).float()
    y = torch.from_numpy(y)
    return x[:1000], y[:1000], x[1000:] * 1.5 + 2.0, y[1000:]


def _reference(x_train, y_train, x_test, y_test, **settings) -> float:
    scaler = StandardScaler().fit(x_train.numpy())  # training split only
    clf = LogisticRegression(**settings).fit(scaler.transform(x_train.numpy()), y_train.numpy())
    pred = clf.predict(scaler.transform(x_test.numpy()))
    return 100.0 * float(torch.from_numpy(pred == y_test.numpy()).float().mean())


def test_probe_equals_the_sklearn_reference_and_converges(capsys: pytest.CaptureFixture) -> None:
    probe = Linear()
    x_train, y_train, x_test, y_test = _features()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the probe fails the test
        result = probe.fit_score(x_train, y_train, x_test, y_test)
    expected = _reference(x_train, y_train, x_test, y_test, C=result["C"], max_iter=probe.max_iter, tol=probe.tol,
                          solver=probe.solver)
    assert result["top1"] == expected  # the chosen C refitted on all training images
    assert result["converged"] is True
    assert capsys.readouterr().err == ""


def test_a_fit_that_does_not_converge_is_marked_and_announced_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """sklearn's ConvergenceWarning (with its URLs) is caught; the result says converged: false and
    one line of our own says what to do."""
    x_train, y_train, x_test, y_test = _features()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Linear(C=1.0, max_iter=3).fit_score(x_train, y_train, x_test, y_test)
    assert result["converged"] is False and result["iterations"] == 3
    err = capsys.readouterr().err
    assert err == ("linear probe: newton-cg did not converge in 3 iterations (result marked converged: false); "
                   "raise the protocol's max_iter\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _reference(x_train, y_train, x_test, y_test, C=1.0, max_iter=3, tol=1e-4, solver="newton-cg")
    assert result["top1"] == expected  # still scored, with the same settings


def test_other_warnings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ConvergenceWarning is the probe's business: another warning raised during a fit escapes
    (one per fit: the 7 of the C search and the refit)."""
    from sklearn.exceptions import ConvergenceWarning

    class Noisy(LogisticRegression):
        def fit(self, x, y):
            warnings.warn("something else", UserWarning, stacklevel=2)
            warnings.warn("lbfgs failed to converge", ConvergenceWarning, stacklevel=2)
            return super().fit(x, y)

    monkeypatch.setattr(linear, "LogisticRegression", Noisy)
    with pytest.warns(UserWarning, match="something else") as record:
        result = linear.Linear().fit_score(*_features())
    assert [w.category for w in record] == [UserWarning] * (len(linear.C_GRID) + 1)
    assert result["converged"] is False and result["C_search"]["converged"] is False


def _standardised_split(x_train: torch.Tensor, y_train: torch.Tensor, probe: Linear) -> tuple[np.ndarray, ...]:
    x = StandardScaler().fit_transform(x_train.numpy())
    y = y_train.numpy()
    return x, y, validation_split(y, probe.val_fraction, probe.val_seed)


def test_chosen_C_equals_gridsearchcv_on_the_same_split() -> None:
    """scikit-learn's own choice: GridSearchCV over the same grid, the same predefined split of the
    standardised training features, scored by accuracy; the per-C validation top-1 agree too (our
    fits are warm-started along the grid, its fits start cold: the same optimum to the tolerance)."""
    x_train, y_train, x_test, y_test = _features()
    probe = Linear()
    result = probe.fit_score(x_train, y_train, x_test, y_test)
    x, y, val = _standardised_split(x_train, y_train, probe)
    search = GridSearchCV(LogisticRegression(max_iter=probe.max_iter, tol=probe.tol, solver=probe.solver),
                          {"C": list(linear.C_GRID)}, scoring="accuracy", cv=PredefinedSplit(np.where(val, 0, -1)),
                          refit=False).fit(x, y)
    assert result["C"] == result["C_search"]["C"] == search.best_params_["C"]
    assert result["C"] != 1.0  # the search moved C off the old fixed default on these features
    assert result["C_search"]["val_top1"] == pytest.approx(100 * search.cv_results_["mean_test_score"], abs=1e-9)
    assert result["C_search"]["grid"] == list(linear.C_GRID)
    assert result["C_search"]["val_images"] == int(val.sum())


def test_the_search_is_deterministic_and_a_fixed_C_equals_the_chosen_one() -> None:
    x_train, y_train, x_test, y_test = _features()
    first = Linear().fit_score(x_train, y_train, x_test, y_test)
    assert Linear().fit_score(x_train, y_train, x_test, y_test) == first  # same features: same C, same top-1
    fixed = Linear(C=first["C"]).fit_score(x_train, y_train, x_test, y_test)
    assert fixed == {k: v for k, v in first.items() if k != "C_search"}
    other = Linear(val_seed=1).fit_score(x_train, y_train, x_test, y_test)
    assert other["C_search"]["val_top1"] != first["C_search"]["val_top1"]  # the seed moves the split


def test_a_fixed_C_skips_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_search(*args, **kwargs):
        raise AssertionError("searched although C was fixed")

    monkeypatch.setattr(linear, "val_scores", no_search)
    x_train, y_train, x_test, y_test = _features()
    result = Linear(C=0.05).fit_score(x_train, y_train, x_test, y_test)
    assert result["C"] == 0.05 and "C_search" not in result
    assert result["top1"] == _reference(x_train, y_train, x_test, y_test, C=0.05, max_iter=1000, tol=1e-4,
                                        solver="newton-cg")


def test_validation_split_is_stratified_and_seeded() -> None:
    y = np.array([c for c in range(5) for _ in (range(1) if c == 4 else range(8 + 2 * c))])  # 8, 10, 12, 14, 1
    val = validation_split(y, 0.25, seed=0)
    assert np.bincount(y[val], minlength=5).tolist() == [2, 2, 3, 4, 0]  # round(0.25 n); a lone image stays
    assert np.array_equal(val, validation_split(y, 0.25, seed=0))
    assert not np.array_equal(val, validation_split(y, 0.25, seed=1))
    two = np.array([0, 0, 1, 1])
    assert np.bincount(two[validation_split(two, 0.9, seed=0)]).tolist() == [1, 1]  # one always stays to fit


def test_settings_name_auto_or_a_number() -> None:
    assert PROTOCOLS.validate("linear", {"C": "auto"})["C"] == "auto"
    assert PROTOCOLS.build("linear", **PROTOCOLS.validate("linear", {"C": 1})).C == 1.0
    assert PROTOCOLS.build("linear").settings() == {"C": "auto", "C_grid": list(linear.C_GRID), "val_fraction": 0.2,
                                                    "val_seed": 0, "max_iter": 1000, "tol": 1e-4,
                                                    "solver": "newton-cg"}
    with pytest.raises(Exception, match="C"):
        PROTOCOLS.validate("linear", {"C": "often"})


def test_auto_needs_two_images_of_some_class() -> None:
    y = torch.arange(4)
    Linear(C=1.0).check(y)
    with pytest.raises(ValueError) as err:
        Linear().check(y)
    assert str(err.value) == ("linear: C = auto holds out training images to choose C, but no class has 2 "
                              "training images; set C to a number")


def test_a_C_at_the_edge_of_the_grid_is_announced_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """On these features validation top-1 still rises at C = 0.01, so a grid that stops there ends on
    its best C, which may not be the optimum: one line says so (the default grid's choice is inside)."""
    x_train, y_train, x_test, y_test = _features()
    result = Linear(C_grid=[1e-3, 1e-2]).fit_score(x_train, y_train, x_test, y_test)
    assert result["C"] == 0.01
    assert capsys.readouterr().err == ("linear probe: the chosen C = 0.01 is the C_grid's largest; a wider C_grid "
                                       "may score higher\n")
