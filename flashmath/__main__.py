"""``python -m flashmath``: the same command as ``flashmath``."""

import sys

from flashmath.cli import main

sys.exit(main())
