"""``python -m flashmath.cli`` (as ``torchrun -m flashmath.cli ring`` runs it): the same
command as ``flashmath`` and ``python -m flashmath``."""

import sys

from flashmath.cli import console

if __name__ == "__main__":
    sys.exit(console())
