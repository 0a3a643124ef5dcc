"""``python -m hasten`` is the ``hasten`` command."""

import sys

from hasten.commands.cli import main

sys.exit(main())
