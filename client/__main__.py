"""`python -m vaeserve.client`: the same as `vae-generate`."""

import sys

from vaeserve.client.generate import main

sys.exit(main())
