"""`python -m qcownbd` is the same program as the `qcownbd` console script."""

import sys

from qcownbd.cli import main

sys.exit(main())
