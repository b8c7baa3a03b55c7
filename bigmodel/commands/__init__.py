"""One module per command (``bigmodel run``, ``transfer``, ``ensemble``, ``analyze``, ``report``,
``compare``, ``sweep``): each builds what its command needs from a recipe or a run directory and
hands the work to the layers below (train, transfer, analysis). :mod:`bigmodel.api` is the façade
over them, :mod:`bigmodel.cli` the command line over that.
"""
