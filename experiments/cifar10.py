"""Quantization-aware training of ResNet-20 on CIFAR-10 with AlignQ: `python experiments/cifar10.py --bits 4`.

Trains FP32 first (or --init-from), then the quantized model; --help lists every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignq_jax.cli.classification import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(dataset="cifar10", description=__doc__))
