"""``python -m virtkit.cli``."""

import sys

from virtkit.cli import main

sys.exit(main())
