"""``python -m mmcompress.cli``."""

import sys

from . import main

sys.exit(main())
