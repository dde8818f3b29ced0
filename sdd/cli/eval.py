"""``sdd-eval``: evaluate checkpoints and baselines on prompt suites, in one command (``sdd.eval.harness``).

    sdd-eval --config configs/eval/tiny.yaml
    sdd-eval --config configs/eval/sdd_nudity_sd14.yaml paths.sdd=outputs/sdd-nudity/pipeline out=outputs/eval-nudity
    accelerate launch --multi_gpu --num_processes 8 -m sdd.cli.eval --config configs/eval/sdd_i2p_coco_sd14.yaml

Every key of the config is listed in ``sdd/eval/schema.py``.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from sdd import api
from sdd.config import load_config
from sdd.errors import run_main
from sdd.eval.schema import EvalConfig, check_overrides


def parse(argv=None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="sdd-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with EvalConfig keys (configs/eval/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. paths.sdd=outputs/run/pipeline")
    args = parser.parse_intermixed_args(argv)
    check_overrides(args.overrides)
    return load_config(EvalConfig, args.config, args.overrides)


def main(argv=None) -> Optional[dict]:
    cfg = parse(argv)
    report = api.evaluate(cfg)
    if report is not None:
        print(f"\nreport: {os.path.join(cfg.out, 'report.md')} (json: {os.path.join(cfg.out, 'report.json')}); "
              f"{report['run']['images_generated']} images generated, {report['run']['images_already_there']} "
              f"already there; {report['run']['seconds_total']} s")
    return report


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
