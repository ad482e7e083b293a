"""``python -m toolkit ...`` (and ``torchrun --nproc_per_node=N -m toolkit compress ...``)."""

import sys

from .cli import main

sys.exit(main())
