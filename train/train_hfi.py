"""HFI step 2: learn a token for a concept by reward-weighted textual inversion on generated images.

    python train/train_hfi.py --config configs/hfi/shapes_red.yaml images=IMAGES reward=REWARD_RUN output_dir=OUT
    accelerate launch train/train_hfi.py --config configs/hfi/nudity_sd14.yaml ... --resume

Writes OUT/learned_embeds.safetensors ({token: (D,)}, loadable by pipe.load_textual_inversion and by the
learned_embeds key of the SDD / ESD configs), OUT/image_weights.jsonl and a card.
"""

from __future__ import annotations

from sdd.cli.train import run
from sdd.errors import run_main


def main(argv=None):
    return run("hfi", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
