"""`python -m translator.train --config ...`: the same as `translator train`."""

import sys

from translator.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
