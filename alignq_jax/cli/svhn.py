"""Quantization-aware training of MobileNet-v2 on SVHN with AlignQ: `python experiments/svhn.py --bits 4`.

The defaults are the paper's MobileNet-v2/SVHN recipe (docs/method.md §8): 100 epochs for the FP32 stage and for
each quantized stage, lr 0.04 for both, LR x0.1 at epochs 30, 60 and 90 (--milestones 0.3 0.6 0.9), momentum 0.9,
weight decay 2e-4, evaluation batch 100. The official code trains with batch 100; the default here is 96, so that
it splits evenly over 1, 2, 4 and 8 devices. Data: SVHN's train split only (no extra), no augmentation, Normalize
0.5/0.5; --data-dir holding train_32x32.mat and test_32x32.mat, or TFDS svhn_cropped (--download).

Unlike the official code, whose MobileNet-v2 never loaded its FP32 checkpoint (its quantized model was trained
from scratch, docs/method.md, quirk 17), the quantized stage starts from the FP32 stage, as for the other networks.
The network is torchvision's MobileNet-v2 (identity residuals; the official one adds a 1x1 conv -> BN shortcut to
every stride-1 block). Everything else (outputs, --resume, --overwrite, the workdir lock, Ctrl-C) is as in
experiments/cifar10.py; --help lists every flag.
"""

from __future__ import annotations

from alignq_jax.cli import classification

SCRIPT = "experiments/svhn.py"
# The paper's MobileNet-v2/SVHN recipe ({dest: value}); every other flag keeps the classification CLI's default.
SVHN_DEFAULTS = {
    "model": "mobilenet_v2",
    "bits": 4,
    "fp_epochs": 100,
    "epochs": 100,
    "fp_lr": 0.04,
    "lr": 0.04,
    "milestones": [0.3, 0.6, 0.9],
    "weight_decay": 2e-4,
    "batch_size": 96,  # the official 100, rounded to a multiple of 8 devices
    "eval_batch_size": 100,
}


def main(argv=None) -> int:
    """``alignq-svhn``: the classification CLI with SVHN's dataset and defaults; returns the exit status."""
    return classification.main(argv, dataset="svhn_cropped", description=__doc__, defaults=SVHN_DEFAULTS,
                               script=SCRIPT)
