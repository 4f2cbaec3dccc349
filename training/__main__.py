"""`python -m vaeserve.training`: the same as `vae-train`."""

import sys

from vaeserve.training.cli import main

sys.exit(main())
