"""``python -m scop_ext ...`` is the ``scop`` command (``torchrun ... -m scop_ext prune ...``)."""

import sys

from .cli.entry import main

sys.exit(main())
