"""Offline demo on real data (scikit-learn's 8x8 digits): FP32 vs uniform vs AlignQ (with and without ADMM),
clean and shifted test sets, several seeds. `python experiments/digits.py --bits 4` (about 2 minutes on 2 CPU cores).
"""

import sys

from alignq_jax.cli.digits_demo import main

if __name__ == "__main__":
    sys.exit(main())
