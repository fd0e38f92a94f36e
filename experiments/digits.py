"""Offline demo on real data (scikit-learn's 8x8 digits): FP32 vs uniform vs AlignQ (with and without ADMM),
clean and shifted test sets, several seeds. `python experiments/digits.py --bits 4` (about 2 minutes on 2 CPU cores).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignq_jax.cli.digits_demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
