"""Importing this module registers every built-in component."""

import bigmodel.architectures  # noqa: F401
import bigmodel.data  # noqa: F401
import bigmodel.objectives  # noqa: F401
import bigmodel.transfer  # noqa: F401
