"""``python -m bigmodel``: the command line, in the process group when launched by torchrun.

Under ``torchrun --nproc-per-node N -m bigmodel run|pretrain RECIPE ...`` every process joins the
group (NCCL on GPUs, gloo on CPUs) before the command and leaves it after
(:func:`bigmodel.train.distributed.session`); one process without torchrun runs as it always did.
"""

import sys

from bigmodel.cli import main
from bigmodel.train.distributed import session

with session():
    code = main()
sys.exit(code)
