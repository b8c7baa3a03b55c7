"""Importing this module registers every built-in component."""

import bigmodel.architectures  # noqa: F401
import bigmodel.architectures.timm_backbone  # noqa: F401  (architecture `timm`: any timm model)
import bigmodel.data  # noqa: F401
import bigmodel.objectives  # noqa: F401
import bigmodel.transfer  # noqa: F401
