"""``python -m k2stream`` is the ``k2stream`` command."""

import sys

from k2stream.cli import main


sys.exit(main())
