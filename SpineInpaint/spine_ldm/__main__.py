"""``python -m spine_ldm ...`` is the ``spine-ldm`` command (see :mod:`spine_ldm.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
