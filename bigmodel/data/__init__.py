"""Datasets, one file per family; importing the package registers them."""

from bigmodel.data import digits, fractals, imagefolder, npz, shards, torchvision_sets  # noqa: F401
from bigmodel.data.base import ImageDataset, TensorImages

__all__ = ["ImageDataset", "TensorImages"]
