"""`python -m vaeserve.server`: the same as `vae-serve`."""

import sys

from vaeserve.server.app import main

sys.exit(main())
