"""Quantized domain adaptation on offline digits: `python experiments/digits_shift.py --bits 4`.

MNIST -> MNIST-M (built here from real digits and photos) and UCI digits -> MNIST 8x8 by default (--tasks). Per
seed and task: FP32 source only, FP32 DSAN (--method dann for DANN), then every quantizer from the FP32 DSAN model;
writes table1.md, table2.md, best_epoch.md, results.csv, results.json and domain_shift.png; --help lists every flag.
"""

import sys

from alignq_jax.cli.domain_shift import main_digits

if __name__ == "__main__":
    sys.exit(main_digits())
