"""Quantized domain adaptation on Office-31: `python experiments/office31.py --data-dir ROOT --source amazon
--target webcam --method dsan --bits 4 --pretrained resnet50_imagenet.npz`.

Per seed and task: FP32 source only, FP32 DSAN/DANN (ResNet-50 from the ImageNet weights with --pretrained), then
every quantizer from the FP32 adapted model; writes table1.md, table2.md, best_epoch.md, results.csv,
results.json and domain_shift.png; --help lists every flag.
"""

import sys

from alignq_jax.cli.domain_shift import main_office

if __name__ == "__main__":
    sys.exit(main_office())
