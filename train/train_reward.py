"""HFI step 1: train the reward model (an MLP on frozen CLIP image embeddings) on binary or ranking feedback.

    python train/train_reward.py --config configs/hfi/reward_shapes_red.yaml \
        feedback.images=IMAGES feedback.dir=FEEDBACK output_dir=OUT
    accelerate launch train/train_reward.py --config configs/hfi/reward_nudity_sd14.yaml ...

Writes OUT/reward/ (model.safetensors + reward.json) and the held-out accuracy into OUT/train_summary.json.
"""

from __future__ import annotations

from hfi.reward import RewardConfig, RewardMethod, add_to_summary
from sdd.errors import run_main
from sdd.files import to_json
from sdd.loop import train_main


def report(cfg, method) -> None:
    metrics = method.metrics()
    add_to_summary(cfg.output_dir, "reward_metrics", metrics)  # held-out accuracy in the run summary
    print("reward metrics:", to_json({k: v for k, v in metrics.items() if k != "mode"}))


def main(argv=None):
    return train_main(RewardConfig, RewardMethod, argv, __doc__, on_done=report)


if __name__ == "__main__":
    run_main(main)
