"""``python -m valleys``: the command line."""

import sys

from valleys.cli import main

sys.exit(main())
