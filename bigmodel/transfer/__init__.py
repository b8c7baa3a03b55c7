"""Transfer protocols, one file each; importing the package registers them.

Called, the package is the scripting function ``bigmodel.transfer(subject, task, protocol,
**settings)`` (:func:`bigmodel.api.transfer_task`): a function of that name in ``bigmodel`` would be
replaced by this subpackage as soon as anything imports ``bigmodel.transfer.*``, so the subpackage
itself is made callable.
"""

import sys
import types

from bigmodel.transfer import fewshot, finetune, knn, linear  # noqa: F401
from bigmodel.transfer.base import Protocol

__all__ = ["Protocol"]


class _CallablePackage(types.ModuleType):
    def __call__(self, subject: object, task: object, protocol: str, **settings: object) -> dict:
        from bigmodel.api import transfer_task

        return transfer_task(subject, task, protocol, **settings)


sys.modules[__name__].__class__ = _CallablePackage
