"""The exception types a user sees, one per kind of input that can be wrong (a leaf module: it
imports nothing from bigmodel, so every layer can raise them).

Each is one line for the user; the CLI prints ``"<kind> error: <message>"`` and exits with status 2,
so the line says whether the recipe, the data, a checkpoint, an image or an export request was at
fault. A diverged run is not bad input: :class:`NonFiniteLoss` exits with status 4; nor is a full
disk: :class:`DiskFull` exits with status 5.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a user can fix: one line, exit status 2, nothing written."""

    kind = "input"


class RecipeError(InputError):
    """A recipe problem: an unknown key or component, a bad value, an impossible combination."""

    kind = "recipe"


class DataError(InputError):
    """A data set that is missing, unreadable or not what the recipe says."""

    kind = "data"


class CheckpointError(InputError):
    """No usable checkpoint or run directory, or weights that do not fit the model."""

    kind = "checkpoint"


class ImageError(InputError):
    """An image file that cannot be read (predict)."""

    kind = "image"


class ExportError(InputError):
    """An export the format cannot express (e.g. a small-image stem in timm's layout)."""

    kind = "export"


class NonFiniteLoss(RuntimeError):
    """Training diverged: a non-finite loss or gradient (exit status 4, the last good checkpoint kept)."""


class DiskFull(RuntimeError):
    """No space left to write a checkpoint or the metrics: nothing is lost (the partial checkpoint is
    removed, the previous one kept), the run resumes once space is freed (exit status 5)."""
