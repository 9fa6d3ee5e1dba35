"""``python -m grn_core ...``: the command line (:mod:`grn_core.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
