"""Erase concepts from a Stable Diffusion UNet with SalUn (Fan et al. 2024): saliency-masked unlearning.

    accelerate launch train/train_salun.py --config configs/salun/nudity_sd14.yaml
    accelerate launch train/train_salun.py --config configs/salun/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("salun", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
