"""Transfer protocols, one file each; importing the package registers them."""

from bigmodel.transfer import fewshot, finetune, knn, linear  # noqa: F401
from bigmodel.transfer.base import Protocol

__all__ = ["Protocol"]
