import sys

from bigmodel.cli import main

sys.exit(main())
