"""python -m jobs.finetune --input URI --model URI --output URI [...]: the same flags as ``cnnbatch finetune``.

Submitted as ``ray job submit --working-dir . -- python -m jobs.finetune ...``: the fit runs on one Ray worker
with the GPUs of one node; this driver only checks the model folder, the input and the output.
"""

import sys

from cnnbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
