"""The Python API: one name per command, over one module per command (:mod:`bigmodel.commands`,
or the layer that does the command's work); the CLI is a thin layer over it.

What ``import bigmodel`` exposes (typed arguments, quiet when asked, objects back):

- :func:`run` (``bigmodel.run``): resolve a recipe, pretrain, transfer, report → :class:`Result`;
- :func:`load` (``bigmodel.load``): a run directory or checkpoint → :class:`Pretrained`;
- :func:`transfer` (``bigmodel.transfer``): one subject scored on one task → its row;
- :func:`resolve_recipe` (``bigmodel.resolve_recipe``): a validated :class:`~bigmodel.recipe.Recipe`.

What the commands call (a validated recipe or a run directory, a console; plain dicts back):
:func:`run_pipeline` (``bigmodel run``, ``pretrain``), :func:`load_recipe` (``--resume``),
:func:`score_checkpoint` (``bigmodel transfer``), :func:`ensemble`, :func:`analyze`, :func:`report`,
:func:`compare`, :func:`sweep`.
"""

from bigmodel.commands.analyze import analyze
from bigmodel.commands.compare import compare
from bigmodel.commands.ensemble import ensemble
from bigmodel.commands.report import report
from bigmodel.commands.run import Overrides, Result, load_recipe, resolve_recipe, run, run_pipeline
from bigmodel.commands.sweep import sweep
from bigmodel.loader import Pretrained, load, load_backbone, run_dir_of
from bigmodel.transfer.score import score as transfer
from bigmodel.transfer.score import score_checkpoint

__all__ = ["Overrides", "Pretrained", "Result", "analyze", "compare", "ensemble", "load", "load_backbone",
           "load_recipe", "report", "resolve_recipe", "run", "run_dir_of", "run_pipeline", "score_checkpoint",
           "sweep", "transfer"]
