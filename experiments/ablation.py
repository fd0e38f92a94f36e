"""The paper's comparison tables in one command: `python experiments/ablation.py --dataset fashion_mnist --data-dir DIR
--bits 2 4 --seeds 3`.

Trains one FP32 model per seed, then every method from it, evaluates each on clean, shifted and corrupted test
sets and writes table1.md, table2.md, corruptions.md, results.csv, results.json and ablation.png; --help lists every
flag.
"""

import sys

from alignq_jax.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
