"""``python -m crossopd ...``: what ``torchrun -m crossopd train`` and ``accelerate launch -m
crossopd train`` run."""

import sys

from crossopd.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
