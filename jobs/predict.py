"""python -m jobs.predict --input URI --model URI --output URI [...]: the same flags as ``cnnbatch predict``."""

import sys

from cnnbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
