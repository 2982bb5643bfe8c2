"""`python -m gptexp.bench` (what `make bench` runs): `gptexp bench` with the same arguments and errors."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
