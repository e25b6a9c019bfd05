"""``python -m sdrt.serve [options]``: the same as ``sdrt serve [options]``."""
import sys

from .cli import main

sys.exit(main())
