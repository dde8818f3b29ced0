"""Erase concepts from a Stable Diffusion UNet with UCE (closed-form edit of the cross-attention keys, values).

    accelerate launch train/train_uce.py --config configs/uce/nudity_sd14.yaml
    accelerate launch train/train_uce.py --config configs/uce/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("uce", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
