"""``python -m sam3ray.cli``: the command line (used by ``sam3ray submit --runtime-env-pip``)."""

import sys

from sam3ray.cli.main import main

sys.exit(main())
