"""`python -m comoe ARGS` is `comoe ARGS`."""

import sys

from comoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
