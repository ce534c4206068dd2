"""``python -m nodegraph``: the same as the ``nodegraph`` command."""

import sys

from .cli import main

sys.exit(main())
