"""``python -m codex_jax.cli``: the same as the ``codex-jax`` script."""

import sys

from codex_jax.cli import main

sys.exit(main())
