"""Train the ShapesWorld base model from scratch: stage 1 the VAE, stage 2 the UNet + text encoder.

    accelerate launch train/train_shapes_base.py --config configs/shapes/base.yaml
    accelerate launch train/train_shapes_base.py --config configs/shapes/base.yaml --resume   # after a stop

Stage 1 writes OUT/vae/ (skipped when vae_path is given or OUT/vae/vae exists); stage 2 writes OUT/pipeline/.
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("shapes-base", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
