"""``python -m jax_eplb.cli ...`` = ``jax-eplb ...``."""

import sys

from jax_eplb.cli import main

sys.exit(main())
