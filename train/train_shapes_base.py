"""Train the ShapesWorld base model from scratch: stage 1 the VAE, stage 2 the UNet + text encoder.

    accelerate launch train/train_shapes_base.py --config configs/shapes/base.yaml
    accelerate launch train/train_shapes_base.py --config configs/shapes/base.yaml --resume   # after a stop

Stage 1 writes OUT/vae/ (skipped when vae_path is given or OUT/vae/vae exists); stage 2 writes OUT/pipeline/.
"""

from __future__ import annotations

import dataclasses
import os

from sdd.config import parse_args, to_dict, to_yaml
from sdd.errors import run_main
from sdd.loop import describe, fit, make_accelerator
from sdd.shapes.train import ShapesBaseConfig, ShapesDiffusionMethod, ShapesVAEMethod


def main(argv=None):
    cfg = parse_args(ShapesBaseConfig, argv, description=__doc__)
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    vae_run = os.path.join(cfg.output_dir, "vae")
    vae_path = cfg.vae_path or os.path.join(vae_run, "vae")
    if not os.path.isdir(vae_path):
        vae_tracking = dataclasses.replace(cfg.tracking, sample_every=0, run_name="shapes-vae")
        result = fit(accelerator, ShapesVAEMethod(cfg, accelerator.device), cfg.vae_train(), vae_tracking, vae_run,
                     to_dict(cfg), to_yaml(cfg))
        if accelerator.is_main_process:
            print(describe(result, vae_run))
    method = ShapesDiffusionMethod(cfg, vae_path, accelerator.device)
    result = fit(accelerator, method, cfg.train, cfg.tracking, cfg.output_dir, to_dict(cfg), to_yaml(cfg))
    if accelerator.is_main_process:
        print(describe(result, cfg.output_dir))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_main(main)
