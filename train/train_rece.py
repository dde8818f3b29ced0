"""Erase concepts from a Stable Diffusion UNet with RECE (UCE, then closed-form adversarial rounds; seconds).

    accelerate launch train/train_rece.py --config configs/rece/nudity_sd14.yaml
    accelerate launch train/train_rece.py --config configs/rece/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("rece", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
