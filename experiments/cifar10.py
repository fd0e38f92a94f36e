"""Quantization-aware training of ResNet-20 on CIFAR-10 with AlignQ: `python experiments/cifar10.py --bits 4`.

Trains FP32 first (or --init-from), then the quantized model; --help lists every flag.
"""

import sys

from alignq_jax.cli.classification import main

if __name__ == "__main__":
    sys.exit(main(dataset="cifar10", description=__doc__))
