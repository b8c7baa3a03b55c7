"""fewshot: exactly k images per class, reproducible per seed; mean ± std over seeds."""

from __future__ import annotations

import pytest
import torch

from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.fewshot import FewShot, sample_shots


def _labels() -> torch.Tensor:
    return torch.tensor([c for c in range(5) for _ in range(8 + c)])[
        torch.randperm(50, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("k", [1, 5, 8])
def test_sampling_is_exact_per_class(k):
    y = _labels()
    idx = sample_shots(y, k, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 5 * k
    assert torch.bincount(y[idx], minlength=5).tolist() == [k] * 5


def test_sampling_is_reproducible_per_seed_and_nested():
    y = _labels()
    assert torch.equal(sample_shots(y, 5, seed=3), sample_shots(y, 5, seed=3))
    assert not torch.equal(sample_shots(y, 5, seed=3), sample_shots(y, 5, seed=4))
    assert set(sample_shots(y, 1, seed=3).tolist()) <= set(sample_shots(y, 5, seed=3).tolist())


def test_too_few_images_for_k_shots_is_an_error():
    with pytest.raises(ValueError, match="class 0 has 8 training images"):
        sample_shots(_labels(), 9, seed=0)


@pytest.mark.parametrize("classifier", ["logistic", "ridge"])
def test_fit_score_reports_every_shot_and_the_primary(classifier):
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 16, generator=g)
    y_tr, y_te = torch.arange(4).repeat(30), torch.arange(4).repeat(10)
    x_tr = centers[y_tr] + torch.randn(120, 16, generator=g)
    x_te = centers[y_te] + torch.randn(40, 16, generator=g)
    protocol = PROTOCOLS.build("fewshot", **PROTOCOLS.validate("fewshot", {"shots": [5, 1], "seeds": 3,
                                                                           "classifier": classifier}))
    res = protocol.fit_score(x_tr, y_tr, x_te, y_te)
    assert set(res["per_shot"]) == {1, 5} and res["primary_shots"] == 5
    for k in (1, 5):
        runs = res["per_shot"][k]["runs"]
        assert len(runs) == 3
        assert res["per_shot"][k]["mean"] == pytest.approx(sum(runs) / 3)
    assert res["top1"] == res["per_shot"][5]["mean"] and res["top1"] > 80.0
    assert res == protocol.fit_score(x_tr, y_tr, x_te, y_te)  # same seeds, same draws


def test_settings_validate():
    assert FewShot(seeds=[7, 9]).seeds == [7, 9]
    assert FewShot(shots=[1, 5], primary=1).primary == 1
    with pytest.raises(ValueError, match="primary"):
        FewShot(shots=[1, 5], primary=10)


def test_more_shots_than_the_smallest_class_is_refused_naming_the_limit():
    y = _labels()  # classes 0..4 with 8..12 images: class 0 is the smallest
    FewShot(shots=[1, 8]).check(y)  # exactly the smallest class's count is fine
    with pytest.raises(ValueError) as err:
        FewShot(shots=[1, 9]).check(y)
    assert str(err.value) == "shots = [1, 9]: 9 shots per class, but class 0 has only 8 training images; use shots <= 8"
    with pytest.raises(ValueError, match=r"shots = \[9\]: 9 shots per class"):  # fit_score checks first too
        FewShot(shots=[9], seeds=1).fit_score(torch.randn(50, 4), y, torch.randn(5, 4), y[:5])


def test_a_task_with_one_class_is_refused():
    with pytest.raises(ValueError) as err:
        FewShot(shots=[1]).check(torch.full((6,), 3))
    assert str(err.value) == "the task's training split has only class 3; a transfer protocol needs at least 2 classes"


def _digit_pixels() -> tuple[torch.Tensor, ...]:
    from bigmodel.data.digits import digits
    from bigmodel.transfer.base import pixels

    train, test = digits("train"), digits("test")
    return pixels(train), train.targets, pixels(test), test.targets


def test_logistic_C_is_cross_validated_within_each_draw_as_gridsearchcv():
    """Per draw: GridSearchCV over the same grid and the same stratified folds of that draw's
    standardised shots, scored by log-loss, picks the same C; the run is the linear probe refitted on
    all shots with that C; a 1-shot draw takes one_shot_C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from bigmodel.transfer.linear import C_GRID, Linear

    x_tr, y_tr, x_te, y_te = _digit_pixels()
    protocol = FewShot(shots=[1, 2, 5], seeds=[0, 1], one_shot_C=0.3)
    res = protocol.fit_score(x_tr, y_tr, x_te, y_te)
    assert res["C"] == res["per_shot"][5]["C"]
    chosen = []
    for k in (1, 2, 5):
        for i, seed in enumerate((0, 1)):
            idx = sample_shots(y_tr, k, seed)
            if k == 1:
                expected = 0.3
            else:
                search = GridSearchCV(LogisticRegression(max_iter=1000, tol=1e-4, solver="newton-cg"),
                                      {"C": list(C_GRID)}, scoring="neg_log_loss",
                                      cv=StratifiedKFold(min(k, 5), shuffle=True, random_state=seed), refit=False)
                shots = StandardScaler().fit_transform(x_tr[idx].numpy())
                expected = search.fit(shots, y_tr[idx].numpy()).best_params_["C"]
            assert res["per_shot"][k]["C"][i] == expected
            refit = Linear(C=expected).fit_score(x_tr[idx], y_tr[idx], x_te, y_te)
            assert res["per_shot"][k]["runs"][i] == refit["top1"]
            chosen.append(expected)
    assert len(set(chosen[2:])) > 1  # the draws do not all land on one C: the search is doing something
    assert res == protocol.fit_score(x_tr, y_tr, x_te, y_te)  # deterministic


def test_ridge_alpha_is_leave_one_out_within_each_draw():
    from sklearn.linear_model import RidgeClassifierCV

    from bigmodel.transfer.fewshot import ALPHA_GRID

    x_tr, y_tr, x_te, y_te = _digit_pixels()
    res = FewShot(shots=[1, 5], seeds=2, classifier="ridge").fit_score(x_tr, y_tr, x_te, y_te)
    for k in (1, 5):
        for seed in (0, 1):
            idx = sample_shots(y_tr, k, seed)
            clf = RidgeClassifierCV(alphas=list(ALPHA_GRID)).fit(x_tr[idx].numpy(), y_tr[idx].numpy())
            assert res["per_shot"][k]["alpha"][seed] == clf.alpha_
            pred = torch.from_numpy(clf.predict(x_te.numpy()))
            assert res["per_shot"][k]["runs"][seed] == 100.0 * (pred == y_te).float().mean().item()
    assert res["alpha"] == res["per_shot"][5]["alpha"] and "C" not in res


def test_a_fixed_C_or_alpha_skips_the_search(monkeypatch):
    import bigmodel.transfer.fewshot as fewshot

    def no_search(*args, **kwargs):
        raise AssertionError("searched although the regularisation was fixed")

    monkeypatch.setattr(fewshot, "val_scores", no_search)
    monkeypatch.setattr(fewshot, "RidgeClassifierCV", no_search)
    x_tr, y_tr, x_te, y_te = _digit_pixels()
    res = FewShot(shots=[2, 5], seeds=2, C=0.5).fit_score(x_tr, y_tr, x_te, y_te)
    assert res["per_shot"][2]["C"] == res["per_shot"][5]["C"] == res["C"] == [0.5, 0.5]
    res = FewShot(shots=[2], seeds=1, classifier="ridge", alpha=3.0).fit_score(x_tr, y_tr, x_te, y_te)
    assert res["alpha"] == [3.0]


def test_auto_is_the_default_and_the_settings_say_so():
    settings = PROTOCOLS.build("fewshot").settings()
    assert (settings["C"], settings["alpha"], settings["folds"], settings["cv_scoring"], settings["one_shot_C"]) == (
        "auto", "auto", 5, "log_loss", 1.0)
    assert PROTOCOLS.build("fewshot", **PROTOCOLS.validate("fewshot", {"C": 2})).C == 2.0
