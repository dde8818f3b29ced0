"""Erase concepts from a Stable Diffusion UNet with SDD (safe self-distillation).

    accelerate launch train/train_sdd.py --config configs/sdd/nudity_sd14.yaml train.lr=2e-5 concepts='[nudity]'
    accelerate launch train/train_sdd.py --config configs/sdd/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("sdd", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
