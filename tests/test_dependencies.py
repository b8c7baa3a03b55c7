"""The torch and torchvision floors declared in pyproject.toml are the versions the suite runs on:
a floor that names an older, untested release (issue 17: ``torch>=2.4`` for code that needs 2.6's
``get_total_norm`` and ``fully_shard``) fails here."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared() -> dict[str, Requirement]:
    block = re.search(r"(?ms)^dependencies = \[(.*?)^\]", PYPROJECT.read_text()).group(1)
    reqs = [Requirement(m) for m in re.findall(r'^\s*"([^"]+)"', block, flags=re.M)]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("dist", ["torch", "torchvision"])
def test_the_declared_floor_is_the_version_the_suite_runs_on(dist):
    req = declared()[dist]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    running = Version(Version(metadata.version(dist)).base_version)  # 2.14.1+cu130 → 2.14.1
    assert floors == [running], f"pyproject.toml declares {req}, the suite runs on {dist} {running}"
    assert req.specifier.contains(running)


def test_the_apis_the_floor_stands_for_exist():
    """What the comment in pyproject.toml names as the reason the floor is at least torch 2.6."""
    import torch
    from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401

    assert callable(torch.nn.utils.get_total_norm)
