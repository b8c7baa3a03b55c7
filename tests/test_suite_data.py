"""The test suite's own data rules (tests/conftest.py): the generated MNIST has MNIST's layout and
scikit-learn's digits as its pixels, zoo recipes read it through the data folder variables, and a
real-data test skips where the data is absent, or fails where CI requires the data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests import conftest


def test_generated_mnist_has_the_layout_of_mnist_and_the_pixels_of_the_digits(mnist_npz) -> None:
    with np.load(mnist_npz) as d:
        arrays = {k: d[k] for k in d.files}
    assert sorted(arrays) == ["classes", "x_test", "x_train", "y_test", "y_train"]
    assert (arrays["x_train"].shape, arrays["x_test"].shape) == ((1297, 28, 28), (500, 28, 28))
    assert arrays["x_train"].dtype == arrays["x_test"].dtype == np.uint8
    assert arrays["y_train"].dtype == arrays["y_test"].dtype == np.int64
    assert arrays["classes"].tolist() == [str(c) for c in range(10)]
    bunch = load_digits()
    x, y = np.concatenate([arrays["x_train"], arrays["x_test"]]), np.concatenate([arrays["y_train"], arrays["y_test"]])
    assert y.tolist() == bunch.target.tolist()
    # pixel (i, j) of a digit fills rows/columns 2+3i .. 4+3i of the 28 px frame; the 2 px border is 0
    assert np.array_equal(x[:, 2:26:3, 2:26:3], np.round(bunch.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(x[:, 2:26, 2:26], x[:, 2:26:3, 2:26:3].repeat(3, 1).repeat(3, 2))
    assert x[:, :2].max() == x[:, 26:].max() == x[:, :, :2].max() == x[:, :, 26:].max() == 0


def test_zoo_recipes_read_the_generated_data(synthetic_data) -> None:
    from bigmodel.recipe import resolve
    from bigmodel.train import build

    recipe = resolve("simclr-resnet", ["run.tiny=true"])
    data = build.dataset(recipe.data, "train")
    with np.load(synthetic_data / "mnist.npz") as d:
        assert np.array_equal(data.images[:, 0].numpy(), d["x_train"][:256])


def test_a_real_data_test_skips_where_the_data_is_absent_and_fails_where_required(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    monkeypatch.delenv(conftest.REQUIRE_VAR, raising=False)
    why = (f"{tmp_path / 'mnist.npz'} is absent (real data: set BIGMODEL_SHARED_DATA to a folder holding "
           f"mnist.npz, or run `bigmodel data get mnist`)")
    with pytest.raises(pytest.skip.Exception) as skipped:
        conftest.shared_file("mnist.npz")
    assert skipped.value.msg == why
    monkeypatch.setenv(conftest.REQUIRE_VAR, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        conftest.shared_file("mnist.npz")
    assert failed.value.msg == f"{why}; BIGMODEL_REQUIRE_REALDATA is set, so a real-data test may not skip"
    (tmp_path / "mnist.npz").write_bytes(b"")
    assert conftest.shared_file("mnist.npz") == tmp_path / "mnist.npz"
