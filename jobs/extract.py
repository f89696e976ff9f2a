"""python -m jobs.extract --input URI --output URI [...]: the same flags as ``cnnbatch extract``."""

import sys

from cnnbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
