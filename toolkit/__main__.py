"""``python -m toolkit ...`` (and ``torchrun --nproc_per_node=N -m toolkit compress ...``)."""

import sys

from toolkit.cli import main

sys.exit(main())
