"""``hfi-loop``: the HFI experiment on ShapesWorld in one run, each stage one ordinary command.

    hfi-loop --model shapes --concept red --out outputs/hfi-loop-red            # the real run (CPU, minutes)
    hfi-loop --model tiny --preset tiny --out outputs/hfi-loop-tiny             # plumbing check in seconds
    hfi-loop ... --dry-run                                                      # print the commands only

1. generate   ``sdd-generate``: images of prompts with and without the concept (seeds 10000+, apart from the
              benchmark's seeds 0..);
2. feedback   ``hfi-autolabel``: the ShapesWorld oracle labels them yes/no, with simulated annotator noise;
3. reward     ``train/train_reward.py``: the reward model on that feedback (held-out accuracy reported);
4. inversion  ``train/train_hfi.py``: the token ``<CONCEPT-hf>``, reward-weighted textual inversion;
5. sdd-text / sdd-hfi   ``train/train_sdd.py`` twice, same settings: erasing the word, erasing the token;
6. bench      ``sdd-shapes bench``: base model, SDD(text), SDD(token) on the same seeds;
7. report     ``OUT/report.md`` and ``OUT/loop_summary.json``: the commands, timings, the reward's accuracy
              against the noisy labels and against the oracle, what the token draws, the benchmark table, and
              how often each model draws the concept unasked (prompts without the word, which the benchmark
              does not cover and where a token learned from images could differ from the word).

A stage whose output exists is skipped, so an interrupted loop continues where it stopped (delete a stage's
folder to redo it). Run from a checkout: the stages call ``train/*.py`` and ``configs/{reward,hfi,sdd}/`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from sdd.errors import UserError, run_main
from sdd.files import to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEEDBACK_SEED = 10000  # image seeds of the feedback set: 10000 + 100 * row + image (the bench uses 0, 1, ...)

# per preset: settings the configs do not fix (sizes of the generated set and of the benchmark) and overrides
PRESETS = {
    "full": {
        "images_per_prompt": 16, "gen_steps": 25, "guidance": 5.0, "bench_n": 96, "bench_retention": 192,
        "reward": [], "hfi": [], "sdd": [],
    },
    "tiny": {  # the plumbing in seconds (the tiny model is random: the numbers mean nothing)
        "images_per_prompt": 2, "gen_steps": 3, "guidance": 5.0, "bench_n": 4, "bench_retention": 4,
        "reward": ["train.steps=20", "reward.hidden=[16]"],
        "hfi": ["train.steps=3", "train.batch_size=2", "hfi.top_k=null", "hfi.weighting=minmax"],
        "sdd": ["train.steps=2", "sdd.ddim_steps=4", "train.checkpoint_every=0", "tracking.num_inference_steps=2"],
    },
}


@dataclass
class Stage:
    name: str
    argv: list[str]
    done: str  # the file whose existence means the stage is complete
    seconds: Optional[float] = None
    skipped: bool = False
    extra: dict = field(default_factory=dict)

    def command(self) -> str:
        shown = ["python" if a == sys.executable else a for a in self.argv]
        return " ".join(shlex.quote(a) for a in shown)


def loop_prompts(concept: str) -> list[str]:
    """Prompts of the feedback set: ones that ask for the concept, and others (so the feedback holds both)."""
    from sdd.shapes import world

    kind = world.concept_kind(concept)
    if kind == "colour":
        asking = [f"a {concept} {s}" for s in world.SHAPES] + [concept, f"something {concept}"]
        other_colours = [c for c in world.COLOURS if c != concept]
        others = [f"a {s}" for s in world.SHAPES] + [f"a {c} {s}" for c, s in zip(other_colours, world.SHAPES)]
    else:
        asking = [f"a {c} {concept}" for c in world.COLOURS] + [concept]
        other_shapes = [s for s in world.SHAPES if s != concept]
        others = [c for c in world.COLOURS] + [f"a {c} {s}" for c, s in zip(world.COLOURS, other_shapes)]
    return asking + others


def hfi_overrides(concept: str) -> list[str]:
    from sdd.shapes import world

    token = f"<{concept}-hf>"
    out = [f"hfi.placeholder_token={token}", f"hfi.initializer_token={concept}"]
    if world.concept_kind(concept) == "shape":
        templates = [t.replace("{shape}", "{}") for t in world.SHAPE_TEMPLATES]
        out.append("hfi.templates=" + to_json(templates))
    return out


def plan(model: str, concept: str, out: str, preset: str, noise: float, seed: int) -> list[Stage]:
    p = PRESETS[preset]
    py = sys.executable
    token = f"<{concept}-hf>"
    d = {name: os.path.join(out, name) for name in
         ("images", "feedback", "reward", "hfi", "sdd-text", "sdd-hfi", "bench")}
    cfg = os.path.join(ROOT, "configs")
    train = os.path.join(ROOT, "train")
    annotator = "auto@shapes-oracle"
    return [
        Stage("generate", [py, "-m", "sdd.cli.generate", "--model", model, "--prompts",
                           os.path.join(out, "prompts.csv"), "--images-per-prompt", str(p["images_per_prompt"]),
                           "--steps", str(p["gen_steps"]), "--guidance", str(p["guidance"]), "--out", d["images"]],
              os.path.join(d["images"], "generation.json")),
        Stage("feedback", [py, "-m", "hfi.auto_feedback", d["images"], "--feedback", d["feedback"], "--detector",
                           f"shapes:{concept}", "--mode", "binary", "--noise", str(noise), "--seed", str(seed)],
              os.path.join(d["feedback"], "autolabel", f"{annotator}.json")),
        Stage("reward", [py, os.path.join(train, "train_reward.py"), "--config",
                         os.path.join(cfg, "reward", "shapes_red.yaml"), f"feedback.images={d['images']}",
                         f"feedback.dir={d['feedback']}", f"feedback.concept={concept}", f"output_dir={d['reward']}",
                         *p["reward"]],
              os.path.join(d["reward"], "reward", "reward.json")),
        Stage("inversion", [py, os.path.join(train, "train_hfi.py"), "--config",
                            os.path.join(cfg, "hfi", "shapes_red.yaml"), f"model.pretrained={model}",
                            f"images={d['images']}", f"reward={d['reward']}", f"output_dir={d['hfi']}",
                            *hfi_overrides(concept), *p["hfi"]],
              os.path.join(d["hfi"], "learned_embeds.safetensors")),
        Stage("sdd-text", [py, os.path.join(train, "train_sdd.py"), "--config",
                           os.path.join(cfg, "sdd", "shapes_red.yaml"), f"model.pretrained={model}",
                           f"concepts=[{concept}]", f"output_dir={d['sdd-text']}", "train.checkpoint_every=0",
                           *p["sdd"]],
              os.path.join(d["sdd-text"], "pipeline", "model_index.json")),
        Stage("sdd-hfi", [py, os.path.join(train, "train_sdd.py"), "--config",
                          os.path.join(cfg, "sdd", "shapes_red_hf.yaml"), f"model.pretrained={model}",
                          f'concepts=["{token}"]',
                          f"learned_embeds={os.path.join(d['hfi'], 'learned_embeds.safetensors')}",
                          f"output_dir={d['sdd-hfi']}", *p["sdd"]],
              os.path.join(d["sdd-hfi"], "pipeline", "model_index.json")),
        Stage("bench", [py, "-m", "sdd.cli.shapes", "bench", "--model", f"base={model}",
                        "--model", f"sdd-text={os.path.join(d['sdd-text'], 'pipeline')}",
                        "--model", f"sdd-hfi={os.path.join(d['sdd-hfi'], 'pipeline')}", "--concept", concept,
                        "--n", str(p["bench_n"]), "--n-retention", str(p["bench_retention"]),
                        "--out", d["bench"], "--quiet"],
              os.path.join(d["bench"], "bench.json")),
    ]


def write_prompts(path: str, prompts: list[str], images_per_prompt: int) -> None:
    import csv
    import io

    from sdd.files import write_text

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt", "seed"])
    for r, prompt in enumerate(prompts):
        writer.writerow([prompt, FEEDBACK_SEED + 100 * r])
    if images_per_prompt > 100:
        raise UserError("at most 100 images per prompt (the seeds of two prompts would overlap)")
    write_text(path, buf.getvalue())


def run_stage(stage: Stage, log_dir: str) -> None:
    timing = os.path.join(log_dir, f"{stage.name}.seconds")
    if os.path.exists(stage.done):
        stage.skipped = True
        if os.path.isfile(timing):  # the time it took when it ran
            with open(timing) as f:
                stage.seconds = float(f.read().strip() or "nan")
        print(f"[{stage.name}] done already ({stage.done}); skipped", flush=True)
        return
    print(f"[{stage.name}] $ {stage.command()}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()
    log_path = os.path.join(log_dir, f"{stage.name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(stage.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    stage.seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"stage {stage.name} failed (exit {proc.returncode}): {tail[0]} - full log: {log_path}")
    with open(timing, "w") as f:
        f.write(f"{stage.seconds}\n")
    print(f"[{stage.name}] {stage.seconds} s", flush=True)


# --- the report ----------------------------------------------------------------------------------------------


def reward_vs_oracle(out: str) -> dict:
    """The reward model's accuracy against the oracle's own (noise-free) answers, on held-out and all images."""
    from sdd.methods.reward import load_reward
    from sdd.stats import wilson

    reward = load_reward(os.path.join(out, "reward"))
    side = os.path.join(out, "feedback", "autolabel", "auto@shapes-oracle.jsonl")
    truth: dict[str, bool] = {}
    noisy: dict[str, bool] = {}
    with open(side) as f:
        for line in f:
            row = json.loads(line)
            truth[row["images"][0]] = bool(row["detector_flag"][0])
            noisy[row["images"][0]] = bool(row["detector_flag"][0]) != bool(row["flipped"][0])
    names = sorted(truth)
    files = [os.path.join(out, "images", n) for n in names]
    scores = reward.score_files(files)
    with open(os.path.join(out, "reward", "config.yaml")) as f:
        import yaml

        rcfg = yaml.safe_load(f)["reward"]
    from sdd.methods.reward import heldout_keys

    held = heldout_keys(names, rcfg["heldout_fraction"], rcfg["split_seed"])
    result = {}
    for part, subset in (("heldout", [n for n in names if n in held]), ("all", names)):
        idx = [names.index(n) for n in subset]
        correct = sum((float(scores[i]) >= 0.5) == truth[names[i]] for i in idx)
        rate = wilson(correct, len(idx))
        result[part] = {"images": len(idx), "accuracy_vs_oracle": rate.value, "ci95": [rate.lo, rate.hi]}
    flips = sum(truth[n] != noisy[n] for n in names)
    result["label_noise_realised"] = flips / len(names)
    return result


def token_fidelity(model: str, concept: str, out: str, n: int, steps: int, guidance: float) -> dict:
    """How often the oracle sees the concept in images of prompts with the word and with the learned token."""
    from sdd.generation import Request, generate
    from sdd.methods.common import load_base
    from sdd.shapes import oracle, world
    from sdd.stats import wilson

    token = f"<{concept}-hf>"
    base = load_base(model, None, "cpu", os.path.join(out, "hfi", "learned_embeds.safetensors"))
    kind = world.concept_kind(concept)
    result = {}
    for label, word in (("word", concept), ("token", token)):
        if kind == "colour":
            prompts = [f"a {word} {s}" for s in world.SHAPES]
        else:
            prompts = [f"a {c} {word}" for c in world.COLOURS]
        prompts.append(word)
        requests = [Request(prompts[i % len(prompts)], seed=i, guidance_scale=guidance) for i in range(n)]
        images = generate(base, requests, num_inference_steps=steps, batch_size=64)
        hits = sum(getattr(r, kind) == concept for r in oracle.read_many(images))
        rate = wilson(hits, n)
        result[label] = {"prompts": prompts, "rate": rate.value, "ci95": [rate.lo, rate.hi], "n": n}
    table = base.text_encoder.get_input_embeddings().weight.detach()
    tok = base.tokenizer
    v = table[tok.convert_tokens_to_ids(token)]
    words = sorted({*world.COLOURS, *world.SHAPES})
    ids = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    cos = torch_cos(v, table[ids])
    result["nearest_words"] = sorted(({"word": w, "cosine": round(float(c), 3)} for w, c in zip(words, cos)),
                                     key=lambda x: -x["cosine"])[:4]
    return result


def implicit_prompts(concept: str) -> list[str]:
    """Prompts that do not name the concept but leave it open (a colour concept: shape-only prompts)."""
    from sdd.shapes import world

    if world.concept_kind(concept) == "colour":
        return [t.replace("{shape}", s) for s in world.SHAPES for t in ("a {shape}", "a photo of a {shape}")]
    return [t.replace("{colour}", c) for c in world.COLOURS for t in ("{colour}", "a {colour} shape")]


def implicit_rates(models: dict[str, str], concept: str, n: int, steps: int, guidance: float) -> dict:
    """How often each model draws the concept unasked (prompts without the word; same seeds for every model).

    What feedback can add over the word: the benchmark's prompts all name the concept, these do not.
    """
    from sdd.generation import Request, generate
    from sdd.models import load_components
    from sdd.shapes import oracle, world
    from sdd.stats import wilson

    prompts = implicit_prompts(concept)
    kind = world.concept_kind(concept)
    requests = [Request(prompts[i % len(prompts)], seed=i, guidance_scale=guidance) for i in range(n)]
    out = {"prompts": prompts}
    for label, path in models.items():
        images = generate(load_components(path), requests, num_inference_steps=steps, batch_size=64)
        hits = sum(getattr(r, kind) == concept for r in oracle.read_many(images))
        rate = wilson(hits, n)
        out[label] = {"rate": rate.value, "ci95": [rate.lo, rate.hi], "k": hits, "n": n}
    return out


def torch_cos(v, rows):
    import torch

    return torch.nn.functional.cosine_similarity(v[None].float(), rows.float(), dim=-1)


def verdict(bench: dict, concept: str) -> list[str]:
    rows = {r["label"]: r["metrics"] for r in bench["rows"]}
    if "sdd-text" not in rows or "sdd-hfi" not in rows:
        return []
    lines = []
    for key, what, lower_better in (("erased_rate", f"'{concept}' still drawn when asked", True),
                                    ("bare_rate", f"'{concept}' on the bare prompt", True),
                                    ("kept", "other attribute kept", False),
                                    ("retention_colour", "colour accuracy, other prompts", False),
                                    ("retention_shape", "shape accuracy, other prompts", False)):
        a, b = rows["sdd-text"].get(key), rows["sdd-hfi"].get(key)
        if not a or not b:
            continue
        if a["hi"] < b["lo"] or b["hi"] < a["lo"]:
            better = (b["rate"] < a["rate"]) == lower_better
            word = "better" if better else "worse"
        else:
            word = "indistinguishable (95 % intervals overlap)"
        lines.append(f"- {what}: SDD(text) {a['rate']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] vs SDD(token) "
                     f"{b['rate']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}]: the token is {word}")
    return lines


def report(out: str, stages: list[Stage], args, preset: dict) -> dict:
    from sdd.files import write_text
    from sdd.shapes.bench import format_table

    with open(os.path.join(out, "bench", "bench.json")) as f:
        bench = json.load(f)
    with open(os.path.join(out, "reward", "train_summary.json")) as f:
        reward_metrics = json.load(f).get("reward_metrics")
    vs_oracle = reward_vs_oracle(out)
    fidelity = token_fidelity(args.model, args.concept, out, n=preset["bench_n"], steps=preset["gen_steps"],
                              guidance=preset["guidance"])
    implicit = implicit_rates({"base": args.model, "sdd-text": os.path.join(out, "sdd-text", "pipeline"),
                               "sdd-hfi": os.path.join(out, "sdd-hfi", "pipeline")}, args.concept,
                              n=2 * preset["bench_n"], steps=preset["gen_steps"], guidance=preset["guidance"])
    summary = {
        "model": args.model, "concept": args.concept, "preset": args.preset, "noise": args.noise,
        "stages": [{"name": s.name, "command": s.command(), "seconds": s.seconds, "skipped": s.skipped}
                   for s in stages],
        "reward_metrics": reward_metrics, "reward_vs_oracle": vs_oracle, "token_fidelity": fidelity,
        "implicit": implicit,
        "bench": bench["rows"],
    }
    write_text(os.path.join(out, "loop_summary.json"), to_json(summary, indent=2) + "\n")
    held = (reward_metrics or {}).get("heldout") or {}

    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "[n/a]"
    lines = [
        f"# HFI loop on ShapesWorld: erasing `{args.concept}` ({args.model}, preset {args.preset})", "",
        "## Commands", "", "```bash", *[s.command() for s in stages], "```", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {s.name} | {s.seconds}{' (an earlier run)' if s.skipped else ''} |" for s in stages], "",
        "## Reward model", "",
        (f"- held-out accuracy against the (noisy, p = {args.noise}) labels: "
         f"{held.get('accuracy', float('nan')):.3f} {ci(held.get('ci95'))} on {held.get('images')} images "
         f"(majority baseline {held.get('majority_baseline', float('nan')):.3f})"),
        (f"- held-out accuracy against the oracle itself: {vs_oracle['heldout']['accuracy_vs_oracle']:.3f} "
         f"{ci(vs_oracle['heldout']['ci95'])} (realised label noise {vs_oracle['label_noise_realised']:.3f})"), "",
        "## The learned token", "",
        (f"- oracle sees `{args.concept}` in {fidelity['word']['rate']:.3f} {ci(fidelity['word']['ci95'])} of "
         f"images of prompts with the word, {fidelity['token']['rate']:.3f} {ci(fidelity['token']['ci95'])} with "
         f"the token (n = {fidelity['word']['n']} each)"),
        "- nearest words (cosine of input embeddings): "
        + ", ".join(f"{x['word']} {x['cosine']}" for x in fidelity["nearest_words"]), "",
        "## ShapesWorld benchmark (95 % Wilson intervals)", "",
        format_table(args.concept, bench["rows"]), "", *verdict(bench, args.concept), "",
        f"## `{args.concept}` drawn unasked (prompts without the word: {', '.join(implicit['prompts'])})", "",
        *[f"- {label}: {implicit[label]['rate']:.3f} {ci(implicit[label]['ci95'])} "
          f"({implicit[label]['k']} of {implicit[label]['n']}, same seeds)"
          for label in ("base", "sdd-text", "sdd-hfi")],
        "",
    ]
    write_text(os.path.join(out, "report.md"), "\n".join(lines))
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="hfi-loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="shapes (the shipped model), tiny, or a pipeline folder")
    parser.add_argument("--concept", default="red", help="a ShapesWorld colour or shape")
    parser.add_argument("--out", default=None, help="run folder (default outputs/hfi-loop-CONCEPT)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--noise", type=float, default=0.1, help="simulated annotator noise (label flip rate)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    from sdd.shapes import world

    try:
        world.concept_kind(args.concept)
    except ValueError as err:
        raise UserError(f"--concept: {err}") from None
    out = os.path.abspath(args.out or os.path.join("outputs", f"hfi-loop-{args.concept}"))
    preset = PRESETS[args.preset]
    stages = plan(args.model, args.concept, out, args.preset, args.noise, args.seed)
    if args.dry_run:
        print("\n".join(s.command() for s in stages))
        return {"stages": [s.command() for s in stages]}
    log_dir = os.path.join(out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    prompts_csv = os.path.join(out, "prompts.csv")
    if not os.path.exists(prompts_csv):
        write_prompts(prompts_csv, loop_prompts(args.concept), preset["images_per_prompt"])
    for stage in stages:
        run_stage(stage, log_dir)
    summary = report(out, stages, args, preset)
    with open(os.path.join(out, "report.md")) as f:
        print(f.read())
    return summary


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
