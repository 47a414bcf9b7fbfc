"""``python -m moaplan``: the same as the ``moaplan`` command."""

import sys

from moaplan.cli import main

sys.exit(main())
