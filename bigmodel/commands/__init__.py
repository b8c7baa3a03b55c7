"""One module per command: each builds what its command needs from a recipe or a run directory
and hands the work to the layers below (train, transfer, analysis).

``run.py`` (``bigmodel run``/``pretrain``; ``bigmodel.run``), ``pretrain.py`` (a recipe → the one
loop), ``report.py``, ``analyze.py``, ``ensemble.py``, ``compare.py``, ``sweep.py``. The transfer
command is :mod:`bigmodel.transfer.score` itself, since ``bigmodel.transfer(...)`` (the callable
package) runs it. :mod:`bigmodel.api` is the façade over them, :mod:`bigmodel.cli` the command line.
"""
