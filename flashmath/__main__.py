"""``python -m flashmath``: the same command as ``flashmath``."""

import sys

from flashmath.cli import console

if __name__ == "__main__":
    sys.exit(console())
