"""python -m jobs.train --features URI [URI ...] --output URI [...]: the same flags as ``cnnbatch train``.

Submitted as ``ray job submit --working-dir . -- python -m jobs.train ...``: the fit runs on a Ray worker that
holds a GPU when the cluster has one; this driver only validates the feature sets.
"""

import sys

from cnnbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
