"""``sdd-export``: export any checkpoint of a run again (another checkpoint, the student, fp16, merged LoRA).

    sdd-export outputs/sdd-tiny                                   # latest checkpoint, the run's settings
    sdd-export outputs/sdd-tiny --checkpoint step-000010 --out E  # a given checkpoint into folder E
    sdd-export outputs/sdd-tiny sdd.export=student export.dtype=fp16
"""

from __future__ import annotations

import argparse
import os

import yaml

from sdd.config import load_config
from sdd.errors import UserError, run_main
from sdd.files import check_writable_dir, remove_stale_temporaries, reporting_write_failures
from sdd.loop import list_checkpoints, load_method_checkpoint
from sdd.methods import registry


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sdd-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a training output_dir (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="'latest', a step-NNNNNN name, or a folder")
    parser.add_argument("--out", default=None, help="export folder (default: the run folder)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config, e.g. export.dtype=fp16")
    args = parser.parse_intermixed_args(argv)

    config_path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise UserError(f"{args.run_dir} is not a training run folder (no config.yaml)")
    with open(config_path) as f:
        method_name = (yaml.safe_load(f) or {}).get("method")
    methods = registry()
    if method_name not in methods:
        raise UserError(f"{config_path}: unknown method {method_name!r}, expected one of {sorted(methods)}")
    schema, method_cls = methods[method_name]
    cfg = load_config(schema, config_path, [*args.overrides, "tracking.tracker=none"])

    if args.checkpoint == "latest":
        found = list_checkpoints(args.run_dir)
        if not found:
            raise UserError(f"{args.run_dir}/checkpoints holds no checkpoint")
        checkpoint = found[-1]
    elif os.path.isdir(args.checkpoint):
        checkpoint = args.checkpoint
    else:
        checkpoint = os.path.join(args.run_dir, "checkpoints", args.checkpoint)
        if not os.path.isdir(checkpoint):
            raise UserError(f"--checkpoint: no such checkpoint: {checkpoint}")

    out = args.out or args.run_dir
    check_writable_dir(out, "--out")
    method = method_cls(cfg)
    load_method_checkpoint(method, checkpoint)
    for folder in {args.run_dir, out}:  # what killed exports left behind
        remove_stale_temporaries(folder)
    with reporting_write_failures(out, "export"):
        written = method.export(out)
    print(f"exported {checkpoint}:")
    for key, path in written.items():
        print(f"  {key:9s} {path}")
    return written


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
