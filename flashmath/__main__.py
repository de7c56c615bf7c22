"""``python -m flashmath``: the same command as ``flashmath``."""

import sys

from flashmath.cli import main

if __name__ == "__main__":
    sys.exit(main())
