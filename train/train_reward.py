"""HFI step 1: train the reward model (an MLP on frozen CLIP image embeddings) on binary or ranking feedback.

    python train/train_reward.py --config configs/reward/shapes_red.yaml \
        feedback.images=IMAGES feedback.dir=FEEDBACK output_dir=OUT
    accelerate launch train/train_reward.py --config configs/reward/nudity_sd14.yaml ...

Writes OUT/reward/ (model.safetensors + reward.json) and the held-out accuracy into OUT/train_summary.json.
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("hfi-reward", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
