"""``sdd-export``: export any checkpoint of a run again (another checkpoint, the student, fp16, merged LoRA).

    sdd-export outputs/sdd-tiny                                   # latest checkpoint, the run's settings
    sdd-export outputs/sdd-tiny --checkpoint step-000010 --out E  # a given checkpoint into folder E
    sdd-export outputs/sdd-tiny sdd.export=student export.dtype=fp16
    sdd-export outputs/sdd-tiny --format single-file               # model.safetensors, the A1111/ComfyUI layout

Works on the run folder of every method that exports something (SDD, ESD, HFI's token, the reward model, the
ShapesWorld base model).
"""

from __future__ import annotations

import argparse

from sdd import api
from sdd.errors import run_main


def main(argv=None) -> dict[str, str]:
    parser = argparse.ArgumentParser(prog="sdd-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output_dir (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="'latest', a step-NNNNNN name, or a folder")
    parser.add_argument("--out", default=None, help="export folder (default: the run folder)")
    parser.add_argument("--format", choices=["diffusers", "single-file", "both"], default=None,
                        help="diffusers: pipeline/ and unet.safetensors; single-file: model.safetensors in the "
                             "original layout (+ model-config/); default: the run's export.format")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. export.dtype=fp16")
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides] + ([f"export.format={args.format}"] if args.format else [])
    written = api.export(args.run_dir, *overrides, checkpoint=args.checkpoint, out=args.out)
    print(f"exported {args.checkpoint} of {args.run_dir}:")
    for key, path in written.items():
        print(f"  {key:9s} {path}")
    return written


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
