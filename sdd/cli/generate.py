"""``sdd-generate``: images for every method and baseline, from a prompt CSV or the command line.

    sdd-generate --model OUT/pipeline --prompts prompts.csv --out images/
    sdd-generate --model shapes --method sld --sld-preset max --prompt "a red circle" --images-per-prompt 4 --out x/
    sdd-generate --model shapes --method safree --concept red --prompt "a red circle" --out x/
    sdd-generate --config configs/generate/sld_shapes_red_hf.yaml learned_embeds=TOKEN/learned_embeds.safetensors

--method: sd (the model as it is), neg (the concept as negative prompt), sld (with --sld-preset weak, medium, strong
or max), sega, safree; --concept is the text the method steers away from; method_settings={...} overrides a
method's settings by name.

The output folder is a ``datasets`` image folder (``sdd.image_folder``): PNG images and ``metadata.jsonl``;
re-running into it skips what is there; under ``accelerate launch`` each process generates its share.
"""

from __future__ import annotations

import argparse

from sdd import api
from sdd.config import load_config
from sdd.errors import run_main
from sdd.files import to_json
from sdd.image_folder import GenerateConfig

FLAGS = {  # command-line flag -> config key
    "model": "model", "method": "method", "sld_preset": "sld_preset", "concept": "concept", "prompts": "prompts",
    "seed": "seed", "images_per_prompt": "images_per_prompt", "guidance": "guidance_scale",
    "steps": "num_inference_steps", "height": "height", "width": "width", "batch_size": "batch_size",
    "limit": "limit", "out": "out", "learned_embeds": "learned_embeds",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sdd-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with GenerateConfig keys")
    for flag in FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None)
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    overrides = [f"{key}={to_json(getattr(args, flag))}" for flag, key in FLAGS.items()
                 if getattr(args, flag) is not None]
    if args.prompt:
        overrides.append(f"prompt={to_json(args.prompt)}")
    cfg = load_config(GenerateConfig, args.config, [*overrides, *args.overrides])
    summary = api.generate(cfg, progress=True)
    if summary.get("out"):
        print(f"{summary['images']} images in {summary['out']} ({summary['generated']} generated, "
              f"{summary['skipped']} already there); method {summary['method']}, model {summary['model']}")
    return summary


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
