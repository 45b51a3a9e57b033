"""`python -m mtpx` (and `torchrun ... -m mtpx`): the mtpx command."""
import sys

from mtpx.cli import main

if __name__ == "__main__":
    sys.exit(main())
