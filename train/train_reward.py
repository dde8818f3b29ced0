"""HFI step 1: train the reward model (an MLP on frozen CLIP image embeddings) on binary or ranking feedback.

    python train/train_reward.py --config configs/hfi/reward_shapes_red.yaml \
        feedback.images=IMAGES feedback.dir=FEEDBACK output_dir=OUT
    accelerate launch train/train_reward.py --config configs/hfi/reward_nudity_sd14.yaml ...

Writes OUT/reward/ (model.safetensors + reward.json) and the held-out accuracy into OUT/train_summary.json.
"""

from __future__ import annotations

import json

from hfi.reward import RewardConfig, RewardMethod, add_to_summary
from sdd.config import parse_args, to_dict, to_yaml
from sdd.errors import run_main
from sdd.loop import describe, fit, make_accelerator


def main(argv=None):
    cfg = parse_args(RewardConfig, argv, description=__doc__)
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = RewardMethod(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    result = fit(accelerator, method, cfg.train, cfg.tracking, cfg.output_dir, to_dict(cfg), to_yaml(cfg))
    if accelerator.is_main_process:
        metrics = method.metrics()
        add_to_summary(cfg.output_dir, "reward_metrics", metrics)  # held-out accuracy in the run summary
        print(describe(result, cfg.output_dir))
        print("reward metrics:", json.dumps({k: v for k, v in metrics.items() if k != "mode"}))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_main(main)
