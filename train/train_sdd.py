"""Erase concepts from a Stable Diffusion UNet with SDD (safe self-distillation).

    accelerate launch train/train_sdd.py --config configs/sdd/nudity_sd14.yaml train.lr=2e-5 concepts='[nudity]'
    accelerate launch train/train_sdd.py --config configs/sdd/tiny.yaml output_dir=OUT --resume
"""

from __future__ import annotations

from sdd.config import parse_args, to_dict, to_yaml
from sdd.errors import run_main
from sdd.loop import describe, fit, make_accelerator
from sdd.methods.sdd import SDDConfig, SDDMethod


def main(argv=None):
    cfg = parse_args(SDDConfig, argv, description=__doc__)
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = SDDMethod(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    result = fit(accelerator, method, cfg.train, cfg.tracking, cfg.output_dir, to_dict(cfg), to_yaml(cfg))
    if accelerator.is_main_process:
        print(describe(result, cfg.output_dir))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_main(main)
