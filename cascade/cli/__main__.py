"""``python -m cascade.cli``: the ``cascade`` command."""

import sys

from cascade.cli import main

sys.exit(main())
