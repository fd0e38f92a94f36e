"""Quantization-aware training of MobileNet-v2 on SVHN with AlignQ: `python experiments/svhn.py --bits 4`.

The paper's MobileNet-v2/SVHN recipe (100 epochs per stage, lr 0.04, LR x0.1 at epochs 30/60/90, weight decay
2e-4; training batch 96 rather than the official 100, so it splits over 1, 2, 4 and 8 devices). The quantized
stage starts from the FP32 stage (the official MobileNet-v2 trained it from scratch). --help lists every flag and
the recipe; alignq_jax/cli/svhn.py holds the defaults.
"""

import sys

from alignq_jax.cli.svhn import main

if __name__ == "__main__":
    sys.exit(main())
