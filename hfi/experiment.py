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

A feedback-defined concept (``--concept warning``: red or yellow triangles, ``sdd.shapes.world.RULES``; no word of
the world names it, the oracle's rule stands in for annotators who recognise it on sight) compares instead:

5. sdd-*      configs/sdd/shapes_warning.yaml's recipe erasing the token and each nearest text ([red triangle,
              yellow triangle], [triangle], [red, yellow]), with and without the preservation term, on each of
              ``--seeds`` (24 runs for three seeds, ~1.5 min each on 2 cores);
6. bench      ``sdd-shapes bench --concept warning``: all of them, and the negative prompt and SLD-Max with the
              token and with the words, on the same seeds;
7. report     the table over training seeds (mean, min-max), collateral on prompts sharing only a colour or only
              a shape with the concept, and the token against each text baseline.

``--feedback ranking`` gives ranked sets of four instead of yes/no (the reward trains on the ranking loss).

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
from typing import Optional, Sequence

from sdd.errors import UserError, run_main
from sdd.files import to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEEDBACK_SEED = 10000  # image seeds of the feedback set: 10000 + 100 * row + image (the bench uses 0, 1, ...)
RANKED_SET = 4  # images per ranked set (ranking feedback; hfi-autolabel --m)

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
    """Prompts of the feedback set: ones that ask for the concept, and others (so the feedback holds both). A
    feedback-defined concept: its cases, the word they share (which draws it part of the time) and every prompt
    that shares only a colour, only a shape or nothing with it."""
    from sdd.shapes import world

    kind = world.concept_kind(concept)
    if kind == "rule":
        rule = world.RULES[concept]
        bare = rule.bare()
        asking = rule.asking() + [bare, f"a {bare}", f"a photo of a {bare}"]
        return asking + rule.colour_mates() + rule.shape_mates() + [f"a {c} {s}" for c, s in rule.others()]
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
    kind = world.concept_kind(concept)
    # a feedback-defined concept starts from the word its cases share ("triangle"): a start the feedback moves
    initializer = world.RULES[concept].bare() if kind == "rule" else concept
    out = [f"hfi.placeholder_token={token}", f"hfi.initializer_token={initializer}"]
    if kind == "shape" or (kind == "rule" and world.concept_kind(initializer) == "shape"):
        templates = [t.replace("{shape}", "{}") for t in world.SHAPE_TEMPLATES]
        out.append("hfi.templates=" + to_json(templates))
    return out


def plan(model: str, concept: str, out: str, preset: str, noise: float, seed: int, feedback: str = "binary",
         seeds: Sequence[int] = (0, 1, 2)) -> list[Stage]:
    """The stages: a colour or shape word (``sdd-text`` vs ``sdd-hfi``, one training seed), or a feedback-defined
    concept (``rule_stages``: the token against every text baseline, with and without preservation, on ``seeds``).
    """
    from sdd.shapes import world

    stages = feedback_stages(model, concept, out, preset, noise, seed, feedback)
    if world.concept_kind(concept) == "rule":
        return stages + rule_stages(model, concept, out, preset, seeds)
    return stages + word_stages(model, concept, out, preset)


def feedback_stages(model: str, concept: str, out: str, preset: str, noise: float, seed: int,
                    feedback: str) -> list[Stage]:
    """Stages 1-4: generate, feedback (binary or ranked sets), reward, inversion."""
    from sdd.shapes import world

    p = PRESETS[preset]
    py = sys.executable
    d = {name: os.path.join(out, name) for name in ("images", "feedback", "reward", "hfi")}
    cfg = os.path.join(ROOT, "configs")
    train = os.path.join(ROOT, "train")
    annotator = "auto@shapes-oracle"
    ranking = ["--m", str(RANKED_SET)] if feedback == "ranking" else []
    # a colour: the random tiny CLIP's embeddings suffice; a rule on colour and shape: the model's own UNet features
    # and its own inversion recipe (configs/hfi/shapes_warning.yaml says how it was chosen)
    rule = world.concept_kind(concept) == "rule"
    reward_cfg, embedder = (f"shapes_{concept}.yaml", [f"embedder.model=unet:{model}"]) if rule else (
        "shapes_red.yaml", [])
    hfi_cfg = f"shapes_{concept}.yaml" if rule else "shapes_red.yaml"
    return [
        Stage("generate", [py, "-m", "sdd.cli.generate", "--model", model, "--prompts",
                           os.path.join(out, "prompts.csv"), "--images-per-prompt", str(p["images_per_prompt"]),
                           "--steps", str(p["gen_steps"]), "--guidance", str(p["guidance"]), "--out", d["images"]],
              os.path.join(d["images"], "generation.json")),
        Stage("feedback", [py, "-m", "hfi.auto_feedback", d["images"], "--feedback", d["feedback"], "--detector",
                           f"shapes:{concept}", "--mode", feedback, *ranking, "--noise", str(noise),
                           "--seed", str(seed)],
              os.path.join(d["feedback"], "autolabel", f"{annotator}.json")),
        Stage("reward", [py, os.path.join(train, "train_reward.py"), "--config",
                         os.path.join(cfg, "reward", reward_cfg), f"feedback.images={d['images']}",
                         f"feedback.dir={d['feedback']}", f"feedback.concept={concept}", f"feedback.mode={feedback}",
                         f"output_dir={d['reward']}", *embedder, *p["reward"]],
              os.path.join(d["reward"], "reward", "reward.json")),
        Stage("inversion", [py, os.path.join(train, "train_hfi.py"), "--config",
                            os.path.join(cfg, "hfi", hfi_cfg), f"model.pretrained={model}",
                            f"images={d['images']}", f"reward={d['reward']}", f"output_dir={d['hfi']}",
                            *hfi_overrides(concept), *p["hfi"]],
              os.path.join(d["hfi"], "learned_embeds.safetensors")),
    ]


def word_stages(model: str, concept: str, out: str, preset: str) -> list[Stage]:
    """Stages 5-6 for a colour or shape word: SDD on the word and on the token, one benchmark."""
    p = PRESETS[preset]
    py = sys.executable
    token = f"<{concept}-hf>"
    d = {name: os.path.join(out, name) for name in ("hfi", "sdd-text", "sdd-hfi", "bench")}
    cfg = os.path.join(ROOT, "configs")
    train = os.path.join(ROOT, "train")
    return [
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


def variants(concept: str) -> dict[str, dict]:
    """What SDD erases in the comparison of a feedback-defined concept: the token, and each of the nearest texts
    (``world.RULES[concept].words``), by name."""
    from sdd.shapes import world

    out = {"hfi": {"concepts": [f"<{concept}-hf>"], "token": True}}
    for name, words in world.RULES[concept].words.items():
        out[f"words-{name}"] = {"concepts": list(words), "token": False}
    return out


def rule_runs(concept: str, seeds: Sequence[int]) -> list[tuple[str, str, bool, int]]:
    """(stage name, variant, with the preservation term, training seed) of every SDD run of the comparison."""
    return [(f"sdd-{v}-{'keep' if keep else 'plain'}-s{s}", v, keep, s)
            for v in variants(concept) for keep in (True, False) for s in seeds]


def baseline_text(concept: str) -> str:
    """The words the inference-time baselines steer away from: the concept's cases (the closest text)."""
    return ", ".join(variants(concept)["words-cases"]["concepts"])


def rule_stages(model: str, concept: str, out: str, preset: str, seeds: Sequence[int]) -> list[Stage]:
    """Stages 5-6 for a feedback-defined concept: configs/sdd/shapes_warning.yaml's recipe on the token and on each
    text baseline, with and without the preservation term, on every training seed; then one benchmark of them all
    and of the negative prompt and SLD-Max, each with the token and with the words."""
    p = PRESETS[preset]
    py = sys.executable
    token = f"<{concept}-hf>"
    embeds = os.path.join(out, "hfi", "learned_embeds.safetensors")
    recipe = os.path.join(ROOT, "configs", "sdd", f"shapes_{concept}.yaml")
    stages, rows = [], [f"base={model}"]
    for name, variant, keep, s in rule_runs(concept, seeds):
        folder = os.path.join(out, name)
        v = variants(concept)[variant]
        argv = [py, os.path.join(ROOT, "train", "train_sdd.py"), "--config", recipe, f"model.pretrained={model}",
                "concepts=" + to_json(v["concepts"]), f"output_dir={folder}", f"train.seed={s}"]
        argv += [f"learned_embeds={embeds}"] if v["token"] else []
        argv += [] if keep else ["sdd.preserve_prompts=[]"]
        stages.append(Stage(name, argv + p["sdd"], os.path.join(folder, "pipeline", "model_index.json")))
        rows.append(f"{name}={os.path.join(folder, 'pipeline')}")
    for method in ("neg", "sld-max"):
        rows += [f"{method}-hfi={model}@{method}:{token}", f"{method}-words={model}@{method}:{baseline_text(concept)}"]
    bench = os.path.join(out, "bench")
    stages.append(Stage("bench", [py, "-m", "sdd.cli.shapes", "bench", *[a for r in rows for a in ("--model", r)],
                                  "--concept", concept, "--learned-embeds", embeds, "--n", str(p["bench_n"]),
                                  "--n-retention", str(p["bench_retention"]), "--out", bench, "--quiet"],
                        os.path.join(bench, "bench.json")))
    return stages


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
    """How often the oracle sees the concept in images of prompts with the word and with the learned token, and
    the reward model's mean score of those images (what a user without an oracle can measure)."""
    from sdd.generation import Request, generate
    from sdd.methods.common import load_base
    from sdd.methods.reward import load_reward
    from sdd.shapes import oracle, world
    from sdd.stats import wilson

    token = f"<{concept}-hf>"
    base = load_base(model, None, "cpu", os.path.join(out, "hfi", "learned_embeds.safetensors"))
    reward = load_reward(os.path.join(out, "reward"))
    kind = world.concept_kind(concept)
    result = {}
    for label, word in (("word", concept), ("token", token)):
        if kind == "rule":  # the concept has no word: its cases in words, and the token used as a noun
            prompts = (world.RULES[concept].asking() if label == "word"
                       else [t.replace("{shape}", token) for t in world.SHAPE_TEMPLATES])
        elif kind == "colour":
            prompts = [f"a {word} {s}" for s in world.SHAPES] + [word]
        else:
            prompts = [f"a {c} {word}" for c in world.COLOURS] + [word]
        requests = [Request(prompts[i % len(prompts)], seed=i, guidance_scale=guidance) for i in range(n)]
        images = generate(base, requests, num_inference_steps=steps, batch_size=64)
        readings = oracle.read_many(images)
        hits = sum(world.shows(r.colour, r.shape, concept) for r in readings)
        rate = wilson(hits, n)
        drawn: dict[str, int] = {}
        for r in readings:
            drawn[f"{r.colour} {r.shape}"] = drawn.get(f"{r.colour} {r.shape}", 0) + 1
        result[label] = {"prompts": prompts, "rate": rate.value, "ci95": [rate.lo, rate.hi], "n": n,
                         "reward": float(reward.score(images).mean()),
                         "drawn": dict(sorted(drawn.items(), key=lambda kv: -kv[1]))}
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


def ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]" if pair else "[n/a]"


def reward_lines(reward_metrics: Optional[dict], vs_oracle: dict, noise: float) -> list[str]:
    held = (reward_metrics or {}).get("heldout") or {}
    return [
        "## Reward model", "",
        (f"- held-out accuracy against the (noisy, p = {noise}) labels: "
         f"{held.get('accuracy', float('nan')):.3f} {ci(held.get('ci95'))} on {held.get('images')} images "
         f"(majority baseline {held.get('majority_baseline', float('nan')):.3f})"),
        (f"- held-out accuracy against the oracle itself: {vs_oracle['heldout']['accuracy_vs_oracle']:.3f} "
         f"{ci(vs_oracle['heldout']['ci95'])} (realised label noise {vs_oracle['label_noise_realised']:.3f})"), "",
    ]


def token_lines(concept: str, fidelity: dict) -> list[str]:
    word = "its cases in words" if fidelity["word"]["prompts"] != [concept] else "the word"
    return [
        "## The learned token", "",
        (f"- oracle sees `{concept}` in {fidelity['word']['rate']:.3f} {ci(fidelity['word']['ci95'])} of "
         f"images of prompts with {word} ({', '.join(fidelity['word']['prompts'])}), "
         f"{fidelity['token']['rate']:.3f} {ci(fidelity['token']['ci95'])} with the token "
         f"({', '.join(fidelity['token']['prompts'])}; n = {fidelity['word']['n']} each)"),
        (f"- the reward model's mean score of those images: {fidelity['word']['reward']:.2f} with the words, "
         f"{fidelity['token']['reward']:.2f} with the token"),
        "- what the token draws (oracle's colour and shape: images): "
        + ", ".join(f"{k} {v}" for k, v in fidelity["token"].get("drawn", {}).items()),
        "- nearest words (cosine of input embeddings): "
        + ", ".join(f"{x['word']} {x['cosine']}" for x in fidelity["nearest_words"]), "",
    ]


def command_lines(stages: list[Stage]) -> list[str]:
    return ["## Commands", "", "```bash", *[s.command() for s in stages], "```", "",
            "| stage | seconds |", "|---|---|",
            *[f"| {s.name} | {s.seconds}{' (an earlier run)' if s.skipped else ''} |" for s in stages], ""]


# --- a feedback-defined concept: the comparison over training seeds (pure functions of the bench's rows) --------

COLLATERAL = ("colour_mates", "shape_mates")  # prompts sharing only a colour / only a shape with the concept
NOISE_POINTS = 2.0  # a difference below this many points (of the 3-seed means) is called a tie


def over_seeds(rows: Sequence[dict], base: dict) -> dict:
    """Per metric of ``rows`` (one per training seed, the bench's metrics): the mean, min and max of the rate, in
    points (%); and ``collateral``: per run the mean drop (points) of the collateral groups against ``base``, then
    its mean, min and max over the runs."""
    out = {}
    for key in rows[0]["metrics"]:
        values = [100 * r["metrics"][key]["rate"] for r in rows]
        out[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}
    # one collateral per run (the mean drop of its groups), then the spread over runs, as for every other column
    drops = [sum(100 * (base[k]["rate"] - r["metrics"][k]["rate"]) for k in COLLATERAL) / len(COLLATERAL)
             for r in rows]
    out["collateral"] = {"mean": sum(drops) / len(drops), "min": min(drops), "max": max(drops), "n": len(rows)}
    return out


def compare(token: dict, words: dict, tie: float = NOISE_POINTS) -> str:
    """How the token's row compares with a text baseline's on (concept left, collateral), both lower-better, in
    points: ``more precise`` (no worse on both, better by more than ``tie`` on one), ``less precise`` (the
    reverse), ``a trade-off`` (better on one, worse on the other) or ``indistinguishable``."""
    d_rate = token["erased_rate"]["mean"] - words["erased_rate"]["mean"]
    d_coll = token["collateral"]["mean"] - words["collateral"]["mean"]
    better = [d < -tie for d in (d_rate, d_coll)]
    worse = [d > tie for d in (d_rate, d_coll)]
    if any(better) and not any(worse):
        return "more precise"
    if any(worse) and not any(better):
        return "less precise"
    return "a trade-off" if any(better) else "indistinguishable"


def rule_summary(bench_rows: Sequence[dict], concept: str, seeds: Sequence[int]) -> dict:
    """The comparison's table: label -> over_seeds (SDD runs over ``seeds``; inference-time rows one value)."""
    rows = {r["label"]: r for r in bench_rows}
    base = rows["base"]["metrics"]
    table = {"base": over_seeds([rows["base"]], base)}
    for variant in variants(concept):
        for keep in ("keep", "plain"):
            runs = [rows[f"sdd-{variant}-{keep}-s{s}"] for s in seeds if f"sdd-{variant}-{keep}-s{s}" in rows]
            if runs:
                table[f"sdd-{variant}-{keep}"] = over_seeds(runs, base)
    for label, row in rows.items():
        if label.startswith(("neg-", "sld-")):
            table[label] = over_seeds([row], base)
    return table


def rule_verdict(table: dict, concept: str) -> list[str]:
    """Token against each text baseline, with the preservation term and without (same recipe, same seeds)."""
    lines = []
    pairs = [(f"sdd-hfi-{k}", f"sdd-{v}-{k}") for k in ("keep", "plain") for v in variants(concept) if v != "hfi"]
    pairs += [(f"{m}-hfi", f"{m}-words") for m in ("neg", "sld-max")]
    for token, words in pairs:
        if token not in table or words not in table:
            continue
        t, w = table[token], table[words]
        lines.append(f"- {token} vs {words}: {concept} left {t['erased_rate']['mean']:.1f} vs "
                     f"{w['erased_rate']['mean']:.1f} %, collateral {t['collateral']['mean']:.1f} vs "
                     f"{w['collateral']['mean']:.1f} points: the token is **{compare(t, w)}**")
    return lines


def rule_table(table: dict, concept: str) -> str:
    from sdd.shapes.bench import column_titles

    titles = {**column_titles(concept), "collateral": "collateral: drop on the mates' prompts vs base (points)"}
    lines = ["| row | " + " | ".join(titles.values()) + " |", "|---|" + "---|" * len(titles)]
    for label, m in table.items():
        cells = []
        for key in titles:
            v = m[key]
            spread = f" ({v['min']:.1f}-{v['max']:.1f})" if v["n"] > 1 else ""
            cells.append(f"{v['mean']:.1f}{spread}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rule_report(out: str, stages: list[Stage], args, bench: dict, reward_metrics, vs_oracle: dict,
                fidelity: dict) -> dict:
    from sdd.files import write_text

    seeds = parse_seeds(args.seeds)
    table = rule_summary(bench["rows"], args.concept, seeds)
    summary = {
        "model": args.model, "concept": args.concept, "preset": args.preset, "noise": args.noise,
        "feedback": args.feedback, "seeds": seeds,
        "stages": [{"name": s.name, "command": s.command(), "seconds": s.seconds, "skipped": s.skipped}
                   for s in stages],
        "reward_metrics": reward_metrics, "reward_vs_oracle": vs_oracle, "token_fidelity": fidelity,
        "table": table, "verdict": rule_verdict(table, args.concept), "bench": bench["rows"],
    }
    write_text(os.path.join(out, "loop_summary.json"), to_json(summary, indent=2) + "\n")
    settings = bench["settings"]
    lines = [
        f"# HFI loop on ShapesWorld: erasing `{args.concept}`, a feedback-defined concept ({args.model}, preset "
        f"{args.preset}, {args.feedback} feedback)", "",
        *command_lines(stages), *reward_lines(reward_metrics, vs_oracle, args.noise),
        *token_lines(args.concept, fidelity),
        f"## The comparison (% of images; SDD rows: mean (min-max) over training seeds {seeds}; benchmark seeds "
        f"{settings['seed']}.., {settings['n']} images per group, {settings['n_retention']} for retention)", "",
        rule_table(table, args.concept), "",
        f"Precision: {args.concept} left (on its cases) and collateral, both lower-better; a difference under "
        f"{NOISE_POINTS} points is a tie.", "", *summary["verdict"], "",
    ]
    write_text(os.path.join(out, "report.md"), "\n".join(lines))
    return summary


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text}: give at least one seed, none twice")
    return seeds


def report(out: str, stages: list[Stage], args, preset: dict) -> dict:
    from sdd.files import write_text
    from sdd.shapes import world
    from sdd.shapes.bench import format_table

    with open(os.path.join(out, "bench", "bench.json")) as f:
        bench = json.load(f)
    with open(os.path.join(out, "reward", "train_summary.json")) as f:
        reward_metrics = json.load(f).get("reward_metrics")
    vs_oracle = reward_vs_oracle(out)
    fidelity = token_fidelity(args.model, args.concept, out, n=preset["bench_n"], steps=preset["gen_steps"],
                              guidance=preset["guidance"])
    if world.concept_kind(args.concept) == "rule":
        return rule_report(out, stages, args, bench, reward_metrics, vs_oracle, fidelity)
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
    lines = [
        f"# HFI loop on ShapesWorld: erasing `{args.concept}` ({args.model}, preset {args.preset})", "",
        *command_lines(stages), *reward_lines(reward_metrics, vs_oracle, args.noise),
        *token_lines(args.concept, fidelity),
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
    parser.add_argument("--concept", default="red",
                        help="a ShapesWorld colour or shape, or a feedback-defined concept (warning: red or yellow "
                             "triangles), compared with the nearest words on --seeds")
    parser.add_argument("--out", default=None, help="run folder (default outputs/hfi-loop-CONCEPT)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--noise", type=float, default=0.1, help="simulated annotator noise (label flip rate)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    parser.add_argument("--feedback", choices=["binary", "ranking"], default="binary",
                        help=f"yes/no per image, or ranked sets of {RANKED_SET}")
    parser.add_argument("--seeds", default="0,1,2",
                        help="training seeds of a feedback-defined concept's comparison (a word: one run)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    from sdd.shapes import world

    try:
        world.concept_kind(args.concept)
    except ValueError as err:
        raise UserError(f"--concept: {err}") from None
    out = os.path.abspath(args.out or os.path.join("outputs", f"hfi-loop-{args.concept}"))
    preset = PRESETS[args.preset]
    stages = plan(args.model, args.concept, out, args.preset, args.noise, args.seed, args.feedback,
                  parse_seeds(args.seeds))
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
