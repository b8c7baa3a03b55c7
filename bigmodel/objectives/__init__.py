"""Objectives, one file each; importing the package registers them."""

from bigmodel.objectives import autoregressive, byol, mae, simclr, supervised  # noqa: F401
from bigmodel.objectives.base import Objective

__all__ = ["Objective"]
