"""``python -m popserver.conformance``."""

import sys

from popserver.conformance.cli import main

if __name__ == "__main__":
    sys.exit(main())
