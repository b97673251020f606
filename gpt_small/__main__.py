"""`python -m gpt_small ...` (and `torchrun -m gpt_small train ...`) run the CLI."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
