"""python -m jobs.plan --input URI [...]: the same flags as ``cnnbatch plan``."""

import sys

from cnnbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
