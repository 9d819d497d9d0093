"""``python -m slimc``: the same as the ``slimc`` command."""

import sys

from slimc.cli import main

if __name__ == "__main__":
    sys.exit(main())
