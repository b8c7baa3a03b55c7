"""Transfer protocols, one file each (registered in :data:`bigmodel.registry.PROTOCOLS`, which
imports them on first lookup), and the scoring of a subject on transfer tasks.

Called, the package is the scripting function ``bigmodel.transfer(subject, task, protocol,
**settings)`` (:func:`bigmodel.transfer.score.score`): a function of that name in ``bigmodel``
would be replaced by this subpackage as soon as anything imports ``bigmodel.transfer.*``, so the
subpackage itself is made callable.
"""

import sys
import types
from typing import Any

from bigmodel.transfer import score as _score
from bigmodel.transfer.base import Protocol

__all__ = ["Protocol"]


class _CallablePackage(types.ModuleType):
    def __call__(self, subject: Any, task: Any, protocol: str, **settings: Any) -> dict[str, Any]:
        return _score.score(subject, task, protocol, **settings)


sys.modules[__name__].__class__ = _CallablePackage
