"""Datasets, one file per family; :data:`bigmodel.registry.DATASETS` imports them on its first lookup,
so a new source is one new file here."""

from bigmodel.data.base import ImageDataset, TensorImages

__all__ = ["ImageDataset", "TensorImages"]
