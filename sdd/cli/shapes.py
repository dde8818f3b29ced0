"""``sdd-shapes``: the ShapesWorld commands.

    sdd-shapes bench --model shapes --model sdd=outputs/sdd-shapes-red/pipeline --concept red --out DIR
    sdd-shapes race --config keep=configs/sdd/shapes_red_keep.yaml --config fast=configs/sdd/shapes_red_fast.yaml \
        --seeds 0,1,2 --eval-seed 10000 --out DIR   # time to a target erasure, side by side
    sdd-shapes read IMAGE...                      # what the oracle sees in images
    sdd-shapes probe shapes                       # does the model take the shape / colour from the text?
    sdd-shapes probe outputs/shapes-sd3/checkpoints/step-001000   # a training checkpoint's live weights
    sdd-shapes ship outputs/shapes-base/pipeline  # install a trained base model as the packaged 'shapes' model

``--model`` takes ``[LABEL=]PATH[@METHOD[:TEXT]]``: PATH is ``shapes`` (the shipped model), ``tiny``, a diffusers
folder or a run folder; METHOD a generation method (``sd``, the default, or a baseline such as ``neg``); TEXT what
that baseline steers away from (default: the concepts' words; a learned token needs ``--learned-embeds``).
``--concept`` is a colour, a shape, several of them, or a feedback-defined concept (``warning``: red or yellow
triangles, ``sdd.shapes.world.RULES``).
"""

from __future__ import annotations

import argparse
import os
import sys

from sdd import api
from sdd.errors import UserError, run_main
from sdd.files import to_json


def cmd_bench(args) -> dict:
    from sdd.shapes.bench import format_table

    concept = "+".join(args.concept or ["red"])
    report = api.benchmark(args.model or ["shapes"], concept, out=args.out, n=args.n, n_retention=args.n_retention,
                           num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                           batch_size=args.batch_size, progress=not args.quiet, learned_embeds=args.learned_embeds)
    print(f'\nShapesWorld: erasing "{concept}" ({args.n} images per group, {args.n_retention} for retention; '
          f"{args.steps} steps of the model's sampler, CFG {args.guidance}; seeds {args.seed}..; "
          "95 % Wilson intervals)")
    print(format_table(concept, report["rows"]))
    for row in report["rows"]:
        print(f"  {row['label']}: {row['seconds']} s")
    if args.out:
        print(f"report: {report['files']['json']}\ngrid:   {report['files']['grid']}")
    return report


def cmd_race(args) -> dict:
    report = api.race(args.config, args.concept or ["red"], seeds=[int(s) for s in args.seeds.split(",")],
                      out=args.out, every=args.every, max_rate=args.max_rate, band=args.band / 100,
                      min_kept=args.min_kept, curve=args.curve, n=args.n, n_retention=args.n_retention,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, eval_seed=args.eval_seed,
                      progress=not args.quiet)
    from sdd.shapes.race import format_report

    print("\n" + format_report(report))
    print(f"report: {os.path.join(args.out, 'race.json')}, {os.path.join(args.out, 'race.md')}")
    return report


def cmd_read(args) -> None:
    from PIL import Image

    from sdd.shapes.oracle import read

    for path in args.images:
        if not os.path.isfile(path):
            raise UserError(f"no such image: {path}")
        r = read(Image.open(path).convert("RGB"))
        print(to_json({"image": path, "colour": r.colour, "shape": r.shape, "pixels": r.pixels}))


def cmd_probe(args) -> list:
    import dataclasses

    from sdd.models import load_components
    from sdd.shapes import probe

    if os.path.isfile(os.path.join(args.model, "model.safetensors")):
        components = probe.load_checkpoint(args.model)
    else:
        components = load_components(args.model)
    rows = probe.run(components, sigmas=[float(s) for s in args.sigmas.split(",")], n=args.n, seed=args.seed)
    print(f"{args.model}: one-step x0 of {args.n} noised scenes (seed {args.seed}) under a wrong shape / colour word, "
          "and between captions\n" + probe.table(rows))
    return [dataclasses.asdict(r) for r in rows]


def cmd_ship(args) -> None:
    from sdd.shapes.ship import ship

    print(ship(args.pipeline, args.dest))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="sdd-shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="erasure benchmark of one or more models")
    b.add_argument("--model", action="append", help="[LABEL=]PATH[@METHOD[:TEXT]]; repeat for several rows")
    b.add_argument("--concept", action="append", default=None,
                   help="a colour (red, green, blue, yellow) or shape (circle, ...); repeat for several at once "
                        "(retention then holds only prompts with none of them), or a feedback-defined concept "
                        "(warning: red or yellow triangles); default red")
    b.add_argument("--learned-embeds", default=None,
                   help="a learned_embeds.safetensors whose token a row's TEXT names (PATH@neg:<warning-hf>)")
    b.add_argument("--n", type=int, default=96, help="images per concept and bare group")
    b.add_argument("--n-retention", type=int, default=192, help="images of prompts without the concepts")
    b.add_argument("--steps", type=int, default=25,
                   help="sampling steps (the model's own sampler: DDIM, or flow-matching Euler)")
    b.add_argument("--guidance", type=float, default=5.0, help="CFG scale")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--out", default=None, help="folder for bench.json and grid.png")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("race", help="time to a target erasure: training configs side by side, as a ratio")
    t.add_argument("--config", action="append", required=True,
                   help="[LABEL=]CONFIG.yaml; two or more, the first is the reference (the paper's loop)")
    t.add_argument("--concept", action="append", default=None, help="as for bench; default red")
    t.add_argument("--seeds", default="0", help="training seeds, comma-separated (each config on each)")
    t.add_argument("--every", type=int, default=50, help="a checkpoint, and a benchmark, every N steps")
    t.add_argument("--max-rate", type=float, default=0.05, help="target: the concept's rate where asked, at most")
    t.add_argument("--band", type=float, default=1.0,
                   help="target: other prompts' colour and shape accuracy at most this many points below the base")
    t.add_argument("--min-kept", type=float, default=0.0,
                   help="target: the rest of the concept's prompts kept in at least this share of its images")
    t.add_argument("--curve", action="store_true", help="benchmark every checkpoint, not only up to the target")
    t.add_argument("--n", type=int, default=96)
    t.add_argument("--n-retention", type=int, default=192)
    t.add_argument("--steps", type=int, default=25, help="sampling steps of the benchmark")
    t.add_argument("--guidance", type=float, default=5.0)
    t.add_argument("--eval-seed", type=int, default=0, help="the benchmark's first seed (10000: held out)")
    t.add_argument("--out", default="outputs/race", help="folder of the runs, race.json and race.md")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_race)
    r = sub.add_parser("read", help="what the oracle reads in images")
    r.add_argument("images", nargs="+")
    r.set_defaults(func=cmd_read)
    p = sub.add_parser("probe", help="does a model take the shape and colour from the text (one-step x0 probes)")
    p.add_argument("model", help="shapes, a pipeline folder, or a shapes-base checkpoint folder (live weights)")
    p.add_argument("--sigmas", default="0.95,0.85,0.7,0.5", help="flow sigmas (a VP model: the same SNR)")
    p.add_argument("--n", type=int, default=36, help="noised scenes")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_probe)
    s = sub.add_parser("ship", help="install a trained base pipeline as the packaged 'shapes' model")
    s.add_argument("pipeline")
    s.add_argument("--dest", default=None)
    s.set_defaults(func=cmd_ship)
    args = parser.parse_args(argv)
    return args.func(args)


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    sys.exit(cli())
