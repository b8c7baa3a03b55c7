"""Objectives, one file each; :data:`bigmodel.registry.OBJECTIVES` imports them on its first lookup,
so a new objective is one new file here."""

from bigmodel.objectives.base import Objective

__all__ = ["Objective"]
