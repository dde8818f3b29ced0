"""Time to a target erasure on ShapesWorld: several training configs side by side, as a user feels them.

    sdd-shapes race --config configs/sdd/shapes_red_keep.yaml --config configs/sdd/shapes_red_fast.yaml \\
        --concept red --seeds 0,1,2 --eval-seed 10000 --out outputs/race-red

Each config is trained on each training seed with a checkpoint every ``every`` steps; each checkpoint is exported
(what the run would export) and judged by the erasure benchmark (``sdd.shapes.bench``) until the first that meets
the target: the concept's rate on the prompts that ask for it at most ``max_rate`` (each concept), the other
prompts' colour and shape accuracy at most ``band`` below the base model's on the same seeds, and the rest of the
concept's prompts kept in at least ``min_kept`` of its images. That checkpoint's training seconds (the loop's wall
time up to it, ``seconds`` in the checkpoint's trainer state) are the time to target; the first config is the
reference (the paper's loop), and every other gets the ratio reference / it per seed and over all seeds (summed
seconds), beside the same ratio for the whole runs. A config that never meets the target within its steps says so
with its last checkpoint's numbers.

The benchmark runs in two stages on its usual seeds: the concept's groups first, the retention group only for a
checkpoint whose concept groups meet the target (most early checkpoints miss on the concept, and retention is two
thirds of the images); ``curve`` judges every group of every checkpoint.

Training runs one after another in this process, so every config sees the same machine in the same run. The race
resumes: a finished training run (``train_summary.json``) is not trained again, an interrupted one continues from
its last checkpoint (its seconds carry over), and each checkpoint's benchmark is kept in ``race.json`` beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

from sdd.config import merge_overrides
from sdd.errors import UserError
from sdd.files import to_json, write_json, write_text
from sdd.loop import TRAINER_STATE, fit, list_checkpoints
from sdd.methods import registry
from sdd.shapes import bench


@dataclass
class Target:
    max_rate: float = 0.05  # the concept on prompts asking for it, at most (each concept)
    band: float = 0.01  # other prompts' colour and shape accuracy at most this below the base model's
    min_kept: float = 0.0  # the rest of the concept's prompts (its shape or colour) kept, at least


@dataclass
class Point:
    """One checkpoint judged: its step, training seconds, the benchmark's rates and whether it met the target."""

    step: int
    seconds: float
    metrics: dict
    met: bool
    why_not: str = ""


@dataclass
class Lane:
    """One config on one training seed."""

    label: str
    seed: int
    run_dir: str
    run_seconds: float = 0.0  # the whole run's training seconds (its last checkpoint's)
    points: list[Point] = field(default_factory=list)

    @property
    def reached(self) -> Optional[Point]:
        return next((p for p in self.points if p.met), None)


def check(metrics: dict, base: dict, concepts: Sequence[str], target: Target) -> str:
    """Why ``metrics`` miss ``target`` against the base model's ``base`` (empty: they meet it)."""
    misses = []
    for c in concepts:
        suffix = bench.metric_suffix(c, concepts)
        rate = metrics["erased_rate" + suffix]["rate"]
        if rate > target.max_rate:
            misses.append(f"{c} {rate:.3f} > {target.max_rate:g}")
        kept = metrics.get("kept" + suffix)  # a feedback-defined concept has no "other attribute" to keep
        if kept is not None and kept["rate"] < target.min_kept:
            misses.append(f"kept{suffix} {kept['rate']:.3f} < {target.min_kept:g}")
    # other prompts: retention, and a feedback-defined concept's prompts sharing only a colour or a shape with it
    for key in [k for k in ("retention_colour", "retention_shape", "colour_mates", "shape_mates") if k in metrics]:
        drop = base[key]["rate"] - metrics[key]["rate"]
        if drop > target.band + 1e-9:
            misses.append(f"{key} {100 * drop:.1f} points below the base > {100 * target.band:g}")
    return "; ".join(misses)


def lane_config(cfg, label: str, seed: int, every: int, out: str):
    """The run config of one lane: ``cfg`` with its seed, folder and a checkpoint every ``every`` steps, all kept."""
    return merge_overrides(cfg, [
        f"output_dir={os.path.join(out, f'{label}-s{seed}')}", f"train.seed={seed}", f"train.checkpoint_every={every}",
        "train.checkpoints_total_limit=null", "tracking.tracker=none", "tracking.sample_every=0",
    ])


def _train(cfg) -> None:
    """Train the lane's run, or finish an interrupted one; a finished run is left as it is."""
    if os.path.isfile(os.path.join(cfg.output_dir, "train_summary.json")):
        return
    if list_checkpoints(cfg.output_dir):
        cfg = merge_overrides(cfg, ["train.resume=latest"])
    registry.train(cfg)


def _checkpoint_state(folder: str) -> dict:
    with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as f:
        state = json.load(f)
    if "seconds" not in state:
        raise UserError(f"{folder} has no training seconds in its {TRAINER_STATE} (written by an older version): "
                        "train the race's runs again")
    return state


def _judge(cfg, run_dir: str, folder: str, settings: bench.BenchSettings, progress: bool,
           target_met: Optional[Callable[[dict], bool]] = None, first: Optional[dict] = None) -> dict:
    """The benchmark's metrics of checkpoint ``folder``, exported to a scratch folder that is removed after.

    With ``target_met`` the benchmark runs in two stages on the same seeds: the concept's own groups first (a third
    of the images), and the retention group only where those meet the target; a checkpoint that misses it already
    is returned with the first stage's metrics alone (its retention columns stay empty). ``first``: the first
    stage's metrics from before, completed with the retention group."""
    scratch = os.path.join(run_dir, "race-export")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        written = registry.export_checkpoint(cfg, run_dir, folder, scratch)
        if "pipeline" not in written:
            raise UserError(f"sdd-shapes race: {run_dir} exports no pipeline (export.format=single-file?), so its "
                            "checkpoints cannot be benchmarked")
        row = bench.parse_row(os.path.basename(folder), written["pipeline"])

        def metrics(s: bench.BenchSettings) -> dict:
            return bench.run([row], s, None, progress=progress)["rows"][0]["metrics"]

        if target_met is None and first is None:
            return metrics(settings)
        # each group's seeds count from settings.seed on their own, so the two stages are the full benchmark split
        if first is None:
            first = metrics(replace(settings, n_retention=0))
            if not target_met(first):
                return first
        return {**first, **metrics(replace(settings, n=0))}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _complete(metrics: dict) -> bool:
    """Whether a judged checkpoint has the retention group (not only the first stage of a two-stage judge)."""
    return "retention_colour" in metrics


def run_lane(cfg, label: str, seed: int, base: dict, settings: bench.BenchSettings, target: Target, every: int,
             out: str, curve: bool = False, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> Lane:
    """Train one lane and judge its checkpoints in order until the first that meets ``target`` (all with
    ``curve``). Judged checkpoints are kept in ``RUN/race.json`` and not judged again."""
    log = log or _say
    cfg = lane_config(cfg, label, seed, every, out)
    _train(cfg)
    run_dir = cfg.output_dir
    cache_path = os.path.join(run_dir, "race.json")
    key = to_json(asdict(settings))
    cache: dict = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            saved = json.load(f)
        cache = saved["points"] if saved.get("settings") == key else {}
    checkpoints = list_checkpoints(run_dir)
    lane = Lane(label, seed, run_dir, _checkpoint_state(checkpoints[-1])["seconds"])
    concepts = bench.concepts_of(settings.concept)

    def meets(metrics: dict) -> bool:
        return not check(metrics, base, concepts, target)

    for folder in checkpoints:
        state = _checkpoint_state(folder)
        name = os.path.basename(folder)
        partial = cache.get(name) if name in cache and not _complete(cache[name]) else None
        if name not in cache or (partial is not None and (curve or meets(partial))):
            cache[name] = _judge(cfg, run_dir, folder, settings, progress, None if curve else meets, partial)
            write_json(cache_path, {"settings": key, "points": cache})
        why = check(cache[name], base, concepts, target)
        lane.points.append(Point(state["step"], state["seconds"], cache[name], not why, why))
        rates = ", ".join(f"{c} {cache[name]['erased_rate' + bench.metric_suffix(c, concepts)]['rate']:.3f}"
                          for c in concepts)
        log(f"{label} seed {seed} step {state['step']} ({state['seconds']:.0f} s): {rates}; "
            f"{'meets the target' if not why else why}")
        if not why and not curve:
            break
    return lane


def race(configs: Sequence[tuple[str, object]], concept: str, seeds: Sequence[int], target: Target, every: int,
         settings: bench.BenchSettings, out: str, curve: bool = False, progress: bool = True,
         log: Optional[Callable[[str], None]] = None) -> dict:
    """Every config (label, run config) on every training seed; the first config is the reference. Writes
    ``race.json`` and ``race.md`` to ``out``; returns the report."""
    if len(configs) < 2:
        raise UserError("sdd-shapes race: give two or more --config (the first is the reference)")
    labels = [label for label, _ in configs]
    if len(set(labels)) != len(labels):
        raise UserError(f"sdd-shapes race: two configs share the label {labels}: name them LABEL=PATH")
    if every < 1:
        raise UserError("sdd-shapes race: --every must be at least 1")
    bench.concepts_of(concept)
    for label, cfg in configs:
        if registry.entry(cfg.method).runner is not fit:
            raise UserError(f"sdd-shapes race: {label} ({cfg.method}) is a closed-form method: it has no checkpoints "
                            "along the way to race (its train_summary.json gives its seconds)")
    log = log or _say
    base_model = configs[0][1].model.pretrained
    base_row = bench.parse_row("base", base_model)
    base = bench.run([base_row], settings, None, progress=progress)["rows"][0]["metrics"]
    lanes = [run_lane(cfg, label, seed, base, settings, target, every, out, curve, progress, log)
             for seed in seeds for label, cfg in configs]
    report = summarise(lanes, labels, seeds, base, settings, target, every)
    write_json(os.path.join(out, "race.json"), report)
    write_text(os.path.join(out, "race.md"), format_report(report))
    return report


def summarise(lanes: Sequence[Lane], labels: Sequence[str], seeds: Sequence[int], base: dict,
              settings: bench.BenchSettings, target: Target, every: int) -> dict:
    """Times to target and ratios against the first label (per seed, and over all seeds from summed seconds)."""
    by = {(lane.label, lane.seed): lane for lane in lanes}
    rows = []
    for label in labels:
        per_seed = []
        for seed in seeds:
            lane, ref = by[(label, seed)], by[(labels[0], seed)]
            hit, ref_hit = lane.reached, ref.reached
            last = hit or (lane.points[-1] if lane.points else None)
            per_seed.append({
                "seed": seed, "steps": hit.step if hit else None, "seconds": hit.seconds if hit else None,
                "run_seconds": lane.run_seconds, "run_ratio": round(ref.run_seconds / lane.run_seconds, 2),
                "ratio": round(ref_hit.seconds / hit.seconds, 2) if hit and ref_hit else None,
                "point": asdict(last) if last else None, "run": lane.run_dir,
            })
        reached = [s for s in per_seed if s["seconds"] is not None]
        ref_seconds = [s["seconds"] for s in rows[0]["seeds"]] if rows else [s["seconds"] for s in per_seed]
        all_reached = len(reached) == len(seeds) and all(x is not None for x in ref_seconds)
        rows.append({
            "label": label, "seeds": per_seed,
            "seconds_total": round(sum(s["seconds"] for s in reached), 1) if all_reached else None,
            "ratio": round(sum(ref_seconds) / sum(s["seconds"] for s in reached), 2) if all_reached else None,
            "run_seconds_total": round(sum(s["run_seconds"] for s in per_seed), 1),
            "run_ratio": round(sum(s["run_seconds"] for s in rows[0]["seeds"]) / sum(s["run_seconds"] for s in per_seed)
                               if rows else 1.0, 2),
        })
    return {"benchmark": "shapesworld-time-to-target", "settings": asdict(settings), "target": asdict(target),
            "every": every, "seeds": list(seeds), "base": base, "rows": rows}


def format_report(report: dict) -> str:
    """The race as a Markdown table: per config and seed, steps and seconds to target and the ratio."""
    t, s = report["target"], report["settings"]
    concepts = bench.concepts_of(s["concept"])
    lines = [f"Time to target: {' and '.join(concepts)} at most {t['max_rate']:g} on prompts asking for it, other "
             f"prompts' colour and shape at most {100 * t['band']:g} point(s) below the base"
             + (f", kept at least {t['min_kept']:g}" if t["min_kept"] else "")
             + f"; checkpoints every {report['every']} steps; benchmark {s['n']} / {s['n']} / {s['n_retention']} "
             f"images at seeds {s['seed']}..", "",
             "| config | training seed | steps to target | seconds to target | ratio | whole run (s) | ratio | "
             + " | ".join(f"{c} on prompts asking" for c in concepts) + " | colour acc., other | shape acc., other |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(concepts) + 2)]
    for row in report["rows"]:
        for seed in row["seeds"]:
            p = seed["point"]
            m = p["metrics"] if p else {}
            rates = [_count(m, "erased_rate" + bench.metric_suffix(c, concepts)) for c in concepts]
            reached = seed["steps"] is not None
            seconds = f"{seed['seconds']:.1f}" if reached else "–"
            lines.append(
                f"| {row['label']} | {seed['seed']} | {seed['steps'] if reached else 'not reached'} | {seconds} | "
                f"{seed['ratio'] if seed['ratio'] is not None else '–'} | "
                f"{seed['run_seconds']:.1f} | {seed['run_ratio']} | " + " | ".join(rates)
                + f" | {_count(m, 'retention_colour')} | {_count(m, 'retention_shape')} |")
        lines.append(f"| {row['label']}, all seeds | | | {row['seconds_total'] or '–'} | **{row['ratio'] or '–'}** | "
                     f"{row['run_seconds_total']} | **{row['run_ratio']}** | " + " | " * (len(concepts) + 1) + " |")
    b = report["base"]
    lines += ["", f"Base model: colour {b['retention_colour']['k']}/{b['retention_colour']['n']}, shape "
              f"{b['retention_shape']['k']}/{b['retention_shape']['n']} on the other prompts."]
    return "\n".join(lines) + "\n"


def _count(metrics: dict, key: str) -> str:
    return f"{metrics[key]['k']}/{metrics[key]['n']}" if key in metrics else "–"


def _say(message: str) -> None:
    print(message, flush=True)  # a race runs for long: its progress reaches a log file as it happens
