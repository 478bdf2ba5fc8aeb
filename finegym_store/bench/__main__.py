"""``python -m finegym_store.bench``: the same as ``finegym-store bench``."""

import sys

from . import main

sys.exit(main())
