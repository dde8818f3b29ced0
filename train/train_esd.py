"""Erase concepts from a Stable Diffusion UNet with ESD (Gandikota et al. 2023).

    accelerate launch train/train_esd.py --config configs/esd/nudity_sd14_esdu.yaml
    accelerate launch train/train_esd.py --config configs/esd/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("esd", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
