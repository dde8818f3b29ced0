"""``sdd-attack``: attack an erased model and measure whether the concept comes back.

    sdd-attack --model outputs/quickstart/sdd-red --concept red --attack concept-inversion --out outputs/attack-ci
    sdd-attack --model shapes --concept red --attack prompt-search --budget 400 --seed 1 --out DIR
    sdd-attack --model OUT/pipeline --concept nudity --attack static --detector nudenet --out DIR
    sdd-attack ... method=sld-max inversion.lr=1e-2 n=192         # any key of sdd.attacks.runner.AttackConfig

Writes DIR/attack.json: {"attack", "asr", "ci95", "n", "budget", "curve": [...], "found": ...} and the images.
An interrupted attack continues where it stopped when run again with the same --out.
"""

from __future__ import annotations

import argparse

from sdd import api
from sdd.errors import run_main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="sdd-attack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run or pipeline folder, shapes, tiny, or a hub id")
    parser.add_argument("--concept", required=True, help="the erased concept, e.g. red or nudity")
    parser.add_argument("--attack", required=True,
                        help="concept-inversion, prompt-search, ring-a-bell, relearn or static")
    parser.add_argument("--budget", type=int, default=None, help="the attack's budget (default: its paper's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector", default=None, help="shapes:CONCEPT, nudenet[:PRESET], q16:PROMPTS, i2p:PROMPTS")
    parser.add_argument("--out", required=True, help="folder for attack.json, what was found and the images")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. method=sld-max n=192")
    args = parser.parse_intermixed_args(argv)
    extra = [f"detector={args.detector}"] if args.detector else []
    record = api.attack(args.model, args.concept, args.attack, *extra, *args.overrides, budget=args.budget,
                        seed=args.seed, out=args.out, progress=True)
    print(f"{record['attack']} on {record['model']} ({record['method']}): ASR {record['asr']:.3f} "
          f"[{record['ci95'][0]:.3f}, {record['ci95'][1]:.3f}] over {record['n']} at budget {record['budget']}")
    for point in record["curve"]:
        print(f"  budget {point['budget']:>6}: ASR {point['asr']:.3f} [{point['ci95'][0]:.3f}, {point['ci95'][1]:.3f}]")
    print(f"record: {args.out}/attack.json")
    return record


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
