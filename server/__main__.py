"""`python -m vaeserve.server`: the same as `vae-serve`."""

import sys

from vaeserve.server.cli import main

sys.exit(main())
