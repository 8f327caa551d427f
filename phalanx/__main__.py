"""``python -m phalanx ...``: the same as the ``phalanx`` console script."""

import sys

from phalanx.cli import main

# The guard matters: rank processes started with multiprocessing's spawn context
# re-import the parent's main module (as __mp_main__) and must not run the CLI again.
if __name__ == "__main__":
    sys.exit(main())
