"""``python -m clisc``: the command line (what Slicer's modules start in a background process)."""
import sys

from .cli import main

sys.exit(main())
