"""Shared fixtures. Real data comes from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests run tiny models, where a second thread buys little, and on a busy 2-core machine two
# OpenMP threads can run tens of times slower than one: every test (and CLI subprocess) uses one.
torch.set_num_threads(1)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real data sets live in ../shared/data beside the repo)")
    return path


@pytest.fixture
def mnist_npz() -> Path:
    return shared_file("mnist.npz")


@pytest.fixture
def cifar10_npz() -> Path:
    return shared_file("cifar10.npz")
