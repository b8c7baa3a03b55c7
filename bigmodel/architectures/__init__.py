"""Backbones, one file per family; importing the package registers them."""

from bigmodel.architectures import igpt, lstm, resnet, vit  # noqa: F401
from bigmodel.architectures.base import Backbone

__all__ = ["Backbone"]
