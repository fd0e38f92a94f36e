"""Converts torchvision's ResNet-50 checkpoint (a .pth state dict, e.g. resnet50-0676ba61.pth) into the .npz of
alignq_jax.pretrained, which ``load_pretrained`` restores into a ResNet50 (or a model holding one) without torch.
Only this conversion needs torch (pip install torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignq_jax.pretrained import CONVERTER, TORCHVISION_RESNET50_URL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=CONVERTER, description=__doc__)
    p.add_argument("checkpoint", type=Path, help=f"torchvision ResNet-50 state dict (.pth), e.g. from "
                                                 f"{TORCHVISION_RESNET50_URL}")
    p.add_argument("output", type=Path, help="the .npz to write (the name is kept as given)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv=None) -> int:
    """Returns 0 on success; 2 (with a message on stderr) when torch is missing, the checkpoint is missing or no
    ResNet-50 state dict, or the output exists without --overwrite."""
    import numpy as np

    from alignq_jax.pretrained import (
        convert_torchvision_resnet50, flatten_variables, read_torch_state_dict, save_pretrained,
    )

    args = build_parser().parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"{CONVERTER}: no checkpoint at {args.checkpoint} (torchvision's ResNet-50 weights: "
              f"{TORCHVISION_RESNET50_URL})", file=sys.stderr)
        return 2
    if args.output.exists() and not args.overwrite:
        print(f"{CONVERTER}: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        variables = convert_torchvision_resnet50(read_torch_state_dict(args.checkpoint))
    except (ImportError, ValueError) as e:
        print(f"{CONVERTER}: {e}", file=sys.stderr)
        return 2
    save_pretrained(variables, args.output)
    flat = flatten_variables(variables)
    n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.startswith("params/"))
    classes = variables["params"]["fc"]["kernel"].shape[-1] if "fc" in variables["params"] else 0
    print(f"wrote {args.output}: {len(flat)} arrays, {n_params:,} parameters, classifier of {classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
