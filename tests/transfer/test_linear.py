"""The linear probe: scikit-learn's logistic regression on train-standardised features, with
convergence checked and library warnings kept out of the user's output."""

from __future__ import annotations

import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from bigmodel.transfer.linear import Linear


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
    expected = _reference(x_train, y_train, x_test, y_test, C=probe.C, max_iter=probe.max_iter, tol=probe.tol,
                          solver=probe.solver)
    assert result["top1"] == expected
    assert result["converged"] is True
    assert capsys.readouterr().err == ""


def test_a_fit_that_does_not_converge_is_marked_and_announced_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """sklearn's ConvergenceWarning (with its URLs) is caught; the result says converged: false and
    one line of our own says what to do."""
    x_train, y_train, x_test, y_test = _features()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Linear(max_iter=3).fit_score(x_train, y_train, x_test, y_test)
    assert result["converged"] is False and result["iterations"] == 3
    err = capsys.readouterr().err
    assert err == ("linear probe: newton-cg did not converge in 3 iterations (result marked converged: false); "
                   "raise the protocol's max_iter\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _reference(x_train, y_train, x_test, y_test, C=1.0, max_iter=3, tol=1e-4, solver="newton-cg")
    assert result["top1"] == expected  # still scored, with the same settings


def test_other_warnings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ConvergenceWarning is the probe's business: another warning raised during the fit escapes."""
    from sklearn.exceptions import ConvergenceWarning

    import bigmodel.transfer.linear as linear

    class Noisy(LogisticRegression):
        def fit(self, x, y):
            warnings.warn("something else", UserWarning, stacklevel=2)
            warnings.warn("lbfgs failed to converge", ConvergenceWarning, stacklevel=2)
            return super().fit(x, y)

    monkeypatch.setattr(linear, "LogisticRegression", Noisy)
    with pytest.warns(UserWarning, match="something else") as record:
        result = linear.Linear().fit_score(*_features())
    assert [w.category for w in record] == [UserWarning]
    assert result["converged"] is False
