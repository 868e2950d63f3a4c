"""``python -m launchers ...``: see :mod:`launchers.launch`."""

import sys

from .launch import main

sys.exit(main())
