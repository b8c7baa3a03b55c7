"""Backbones, one file per family; :data:`bigmodel.registry.ARCHITECTURES` imports them on its first
lookup, so a new family is one new file here."""

from bigmodel.architectures.base import Backbone

__all__ = ["Backbone"]
