"""`python -m gptexp`: the `gptexp` command, so that `torchrun -m gptexp train ...` starts it."""

import sys

from .cli import main

sys.exit(main())
