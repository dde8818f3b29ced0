"""HFI step 2: learn a token for a concept by reward-weighted textual inversion on generated images.

    python train/train_hfi.py --config configs/hfi/hfi_shapes_red.yaml images=IMAGES reward=REWARD_RUN output_dir=OUT
    accelerate launch train/train_hfi.py --config configs/hfi/hfi_nudity_sd14.yaml ... --resume

Writes OUT/learned_embeds.safetensors ({token: (D,)}, loadable by pipe.load_textual_inversion and by the
learned_embeds key of the SDD / ESD configs), OUT/image_weights.jsonl and a card.
"""

from __future__ import annotations

from hfi.inversion import HFIConfig, HFIMethod
from sdd.config import parse_args, to_dict, to_yaml
from sdd.errors import run_main
from sdd.loop import describe, fit, make_accelerator


def main(argv=None):
    cfg = parse_args(HFIConfig, argv, description=__doc__)
    accelerator = make_accelerator(cfg.train, cfg.tracking, cfg.output_dir)
    method = HFIMethod(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes)
    result = fit(accelerator, method, cfg.train, cfg.tracking, cfg.output_dir, to_dict(cfg), to_yaml(cfg))
    if accelerator.is_main_process:
        print(describe(result, cfg.output_dir))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    run_main(main)
