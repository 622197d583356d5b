"""``python -m dedup_index.cli``: the same as the ``dedup-index`` console script."""

import sys

from . import main

sys.exit(main())
