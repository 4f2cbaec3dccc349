"""`python -m vaeserve.export`: the same as `vae-export`."""

import sys

from vaeserve.export.onnx_export import main

sys.exit(main())
