"""``sdd-bench``: training-step speed and memory of SDD / ESD against the reference loop (``sdd.speed``).

    sdd-bench --preset tiny --method sdd --batch-sizes 1,8 --iters 20 --out PERF.json
    sdd-bench --preset sd15 --finetune xattn,full,lora --precision fp32,bf16       # on a GPU
    sdd-bench --preset sdxl --finetune xattn,lora --precision bf16 --switches ours,ours+grad-checkpointing

Each case runs in a fresh process with the same seeds; see ``sdd.speed`` for what the reference case is.
"""

from __future__ import annotations

import argparse
import sys

from sdd import api
from sdd.errors import run_main
from sdd.speed import EXACT_SWITCHES, PRESETS


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdd-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sdd", choices=["sdd", "esd"])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--finetune", default="xattn", help="comma-separated parameter sets")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (latents per step)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switches", default="all",
                        help="all: time every exact switch; default: only the default configuration; or a "
                             f"comma-separated list of: {', '.join(EXACT_SWITCHES)}")
    parser.add_argument("--teacher-bf16", action="store_true", help="also time bf16 autocast for the sampling")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--processes", type=int, default=1, help="also time the default case data-parallel")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    return parser


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    report = api.speed(
        args.method, preset=args.preset, finetunes=args.finetune.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], precisions=args.precision.split(","),
        ddim_steps=args.ddim_steps, switches=args.switches, teacher_bf16=args.teacher_bf16, compile=args.compile,
        processes=args.processes, iters=args.iters, warmup=args.warmup, seed=args.seed, threads=args.threads,
        out=args.out, command="sdd-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(report["table"])
    if args.out:
        print(f"results: {args.out}")
    return report


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
