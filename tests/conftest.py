"""Shared fixtures.

Two kinds of data:

- **generated**: :func:`synthetic_dir` writes, once per session, an ``mnist.npz`` in MNIST's layout
  built from scikit-learn's embedded digits. Every test of the machinery (zoo tiny runs, resume,
  distributed, predict, suites, ...) uses it, through the ``mnist_npz`` path or the ``synthetic_data``
  fixture that points ``$BIGMODEL_DATA`` (and ``$BIGMODEL_SHARED_DATA``) at it, so those tests run
  on any machine, with no download and without our data folder.
- **real**: :func:`shared_file` finds a real data set in ``$BIGMODEL_SHARED_DATA`` (default
  ``../shared/data`` beside the repo) and skips the test, saying why, when it is absent. Tests that
  need it (numbers on real MNIST, golden losses recorded on it) are marked ``realdata``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA_VARS = ("BIGMODEL_DATA", "BIGMODEL_SHARED_DATA")
REQUIRE_VAR = "BIGMODEL_REQUIRE_REALDATA"
SYNTHETIC_TRAIN = 1297  # of scikit-learn's 1,797 digits; the last 500 are the test split

# Tests run tiny models, where a second thread buys little, and on a busy 2-core machine two
# OpenMP threads can run tens of times slower than one: every test (and CLI subprocess) uses one.
torch.set_num_threads(1)


def shared_file(name: str) -> Path:
    """A real data set of the shared data folder; the test is skipped when the file is absent, or
    fails where ``$BIGMODEL_REQUIRE_REALDATA`` is set (CI, ``.ci/run``: no silent skip there)."""
    path = SHARED_DATA / name
    if not path.is_file():
        why = (f"{path} is absent (real data: set BIGMODEL_SHARED_DATA to a folder holding {name}, "
               f"or run `bigmodel data get {Path(name).stem}`)")
        if os.environ.get(REQUIRE_VAR):
            pytest.fail(f"{why}; {REQUIRE_VAR} is set, so a real-data test may not skip")
        pytest.skip(why)
    return path


def synthetic_mnist() -> dict[str, np.ndarray]:
    """MNIST's npz layout from scikit-learn's embedded 8×8 digits: each digit scaled from 0..16 to
    0..255, each pixel repeated 3×3 and padded by 2 (24 px of glyph in a 28 px frame, as MNIST's
    20 px in 28); uint8 ``x_* (N, 28, 28)``, int64 ``y_*``, ``classes`` '0'..'9'. 1,297 training
    and 500 test images, deterministic on every machine."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x = np.pad(x.repeat(3, axis=1).repeat(3, axis=2), ((0, 0), (2, 2), (2, 2)))
    y = bunch.target.astype(np.int64)
    n = SYNTHETIC_TRAIN
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:],
            "classes": np.array([str(c) for c in range(10)])}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A data folder holding the generated ``mnist.npz`` (written once per session)."""
    folder = tmp_path_factory.mktemp("data")
    np.savez(folder / "mnist.npz", **synthetic_mnist())
    return folder


@contextmanager
def data_folder(folder: Path) -> Iterator[Path]:
    """``$BIGMODEL_DATA`` and ``$BIGMODEL_SHARED_DATA`` point at ``folder`` while inside, so a recipe's
    ``$BIGMODEL_DATA/mnist.npz`` (or ``$BIGMODEL_SHARED_DATA/...``) reads the generated file, in this
    process and in CLI subprocesses (``tests.helpers.env`` copies the environment); for session-
    and module-scoped fixtures, which cannot take ``monkeypatch``."""
    with pytest.MonkeyPatch.context() as mp:
        for var in DATA_VARS:
            mp.setenv(var, str(folder))
        yield folder


@pytest.fixture
def synthetic_data(synthetic_dir: Path) -> Iterator[Path]:
    """The zoo recipes' data paths resolve to the generated data for this test; the folder."""
    with data_folder(synthetic_dir):
        yield synthetic_dir


@pytest.fixture
def mnist_npz(synthetic_dir: Path) -> Path:
    """The generated MNIST-layout file (for tests of the machinery, not of numbers on MNIST)."""
    return synthetic_dir / "mnist.npz"


@pytest.fixture
def real_mnist_npz() -> Path:
    return shared_file("mnist.npz")


@pytest.fixture
def cifar10_npz() -> Path:
    return shared_file("cifar10.npz")
