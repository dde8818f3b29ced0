"""``sdd-eval``: evaluate checkpoints and baselines on prompt suites, in one command.

    sdd-eval --config configs/eval/tiny.yaml
    sdd-eval --config configs/eval/sdd_nudity_sd14.yaml paths.sdd=outputs/sdd-nudity/pipeline out=outputs/eval-nudity
    accelerate launch --multi_gpu --num_processes 8 -m sdd.cli.eval --config configs/eval/sdd_i2p_coco_sd14.yaml

For every entry x suite: **generate** with ``sdd.image_folder`` into ``OUT/images/<entry>/<suite>/`` (a
``datasets`` image folder; images already there are skipped), **score** every image once (results cached beside the
images in ``scores.jsonl``, see ``sdd.eval.store``), then **aggregate** (``sdd.eval.suites``) and write
``OUT/report.json``, ``OUT/report.md``, ``OUT/grids/<suite>.png`` (the same prompts and seeds for every entry) and
``OUT/plots/<suite>.png`` (erased rate against retention, ``sdd.eval.plots``). ``tables`` lays the suites' numbers
out as a paper's tables (``sdd.eval.tables``); an entry whose model is null is listed there, not run.

Under ``accelerate launch`` the work is cut into batches of the whole run (``generation.batch_size`` images,
``metrics.batch_size`` for scoring), each handed whole to one process (``assign_units``); the main process merges
the per-process files and aggregates. An image's pixels (and scores) depend slightly on the other images of its
batch; as a batch is the same whatever the number of processes, so is every image, and the report of an N-process
run equals the 1-process report. A batch with a missing image is generated again whole, only the missing files
written. Each process loads an entry's model once, and only if it has images of that entry to generate.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from sdd.errors import UserError
from sdd.eval import store
from sdd.eval.schema import TINY_RANDOM, EntryConfig, EvalConfig
from sdd.eval.suites import SUITES, EntryImages, Models, ScorerSpec, image_files
from sdd.image_folder import GenerateConfig, Job, job_batches, make_jobs
from sdd.jobs import assign_units, distributed_state

# model names built in code with random weights
RANDOM_MODELS = ("tiny", "tiny-sd2v", "tiny-sd3", "tiny-flux", "sd15-random")


@dataclass
class Folder:
    """One entry on one suite: its image folder, generation settings and jobs."""

    entry: EntryConfig
    suite: str
    path: str
    gcfg: GenerateConfig
    jobs: list[Job]


@dataclass
class Plan:
    cfg: EvalConfig
    rows: dict[str, list[dict]]
    folders: list[Folder]
    specs: dict[str, list[ScorerSpec]]
    reference: list[str] = field(default_factory=list)  # coco.reference_dir image names


# --------------------------------------------------------------------------------------------------- checks


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def _hub_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # an id the hub client rejects: let the loader say what is wrong
        return True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _check_model(where: str, model: str) -> None:
    if model == "shapes":
        from sdd.models import SHAPES_MODEL_DIR

        if not os.path.isdir(SHAPES_MODEL_DIR):
            raise UserError(f"{where}: the ShapesWorld model is not installed at {SHAPES_MODEL_DIR} "
                            "(train it, then sdd-shapes ship)")
        return
    if os.path.isdir(model) or model in RANDOM_MODELS:
        return
    if _looks_local(model):
        raise UserError(f"{where}: no such model folder: {model}")
    if _offline() and not _hub_cached(model, "model_index.json"):
        raise UserError(f"{where}: '{model}' is not a local folder and the hub is offline (HF_HUB_OFFLINE); "
                        "download it first or give the path of a diffusers model folder")


def _check_clip(key: str, source: str) -> None:
    if source == TINY_RANDOM or os.path.isdir(os.path.expanduser(source)):
        return
    if _looks_local(source):
        raise UserError(f"{key}: no such CLIP model folder: {source}")
    if _offline() and not _hub_cached(source, "config.json"):
        raise UserError(f"{key}: '{source}' is not a local folder and the hub is offline (HF_HUB_OFFLINE); "
                        f"give a CLIP model folder, or {TINY_RANDOM} for a smoke run")


def _check_file(key: str, path: Optional[str]) -> None:
    if path not in (None, TINY_RANDOM) and not os.path.isfile(path):
        raise UserError(f"{key}: no such file: {path}")


def check_inputs(cfg: EvalConfig) -> None:
    """Everything a user can get wrong that can be seen before generating: one UserError, nothing written."""
    from sdd.methods.inference import describe_method

    for i, e in enumerate(cfg.entries):
        where = f"entries[{i}] ({e.label})"
        try:
            describe_method(e.method, e.concept, e.method_settings)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        if e.model is None:  # not given: listed in the tables, not run
            continue
        _check_model(f"{where}.model", e.model)
        _check_file(f"{where}.learned_embeds", e.learned_embeds)
    m = cfg.metrics
    if "i2p" in cfg.suites:
        if m.q16_prompts is None:
            raise UserError("metrics.q16_prompts: the i2p suite needs Q16's prompt embeddings (.npy or .safetensors, "
                            f"see sdd/detectors.py), or {TINY_RANDOM} for a smoke run")
        _check_file("metrics.q16_prompts", m.q16_prompts)
        _check_clip("metrics.q16_clip", m.q16_clip)
    if "i2p" in cfg.suites or "nudity" in cfg.suites:
        from sdd.eval.suites import _nudenet

        _nudenet(cfg)  # checks preset, classes and threshold
    if "coco" in cfg.suites:
        _check_clip("metrics.clip", m.clip)
        _check_file("metrics.lpips_weights", m.lpips_weights)
        if m.lpips_weights and m.lpips_weights != TINY_RANDOM and not m.lpips_weights.endswith(".safetensors"):
            raise UserError(f"metrics.lpips_weights: {m.lpips_weights} must be a .safetensors file")
        if cfg.coco.reference_dir:
            image_files(cfg.coco.reference_dir)
    if cfg.report.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("report.plots: matplotlib is not installed (pip install -e '.[eval]'), or set "
                            "report.plots=false") from None


# ----------------------------------------------------------------------------------------------------- plan


def generate_config(cfg: EvalConfig, entry: EntryConfig, images_per_prompt: int, out: str) -> GenerateConfig:
    g = cfg.generation
    return GenerateConfig(model=entry.model, learned_embeds=entry.learned_embeds, method=entry.method,
                          concept=entry.concept, method_settings=dict(entry.method_settings), seed=g.seed,
                          images_per_prompt=images_per_prompt, guidance_scale=g.guidance_scale,
                          num_inference_steps=g.num_inference_steps, height=g.height, width=g.width,
                          batch_size=g.batch_size, out=out)


def make_plan(cfg: EvalConfig) -> Plan:
    check_inputs(cfg)
    rows = {name: SUITES[name].rows(cfg) for name in cfg.suites}
    for name in rows:
        rows[name] = [{**r, "dtype": cfg.generation.dtype} for r in rows[name]]
    folders = []
    for entry in cfg.entries:
        if entry.model is None:
            continue
        for name in cfg.suites:
            path = os.path.join(cfg.out, "images", entry.label, name)
            gcfg = generate_config(cfg, entry, SUITES[name].images_per_prompt(cfg), path)
            folders.append(Folder(entry, name, path, gcfg, make_jobs(rows[name], gcfg)))
    specs = {name: SUITES[name].scorers(cfg) for name in cfg.suites}
    reference = image_files(cfg.coco.reference_dir) if "coco" in cfg.suites and cfg.coco.reference_dir else []
    return Plan(cfg, rows, folders, specs, reference)


# ----------------------------------------------------------------------------------------------- generation



def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or total == 0)


def _check_folder(folder: Folder, done: dict[str, dict]) -> None:
    from sdd.image_folder import check_existing, method_name
    from sdd.methods.inference import describe_method

    settings = describe_method(method_name(folder.gcfg), folder.gcfg.concept, folder.gcfg.method_settings)
    try:
        check_existing(folder.gcfg, folder.jobs, done, settings)
    except UserError as err:
        raise UserError(str(err).replace("choose another --out", "choose another out= or remove the folder")) from None
    for job in folder.jobs:
        record = done.get(job.file_name)
        if record is not None and record.get("dtype", "fp32") != job.row["dtype"]:
            raise UserError(f"{folder.path} holds images generated in {record.get('dtype', 'fp32')}, this run uses "
                            f"generation.dtype={job.row['dtype']}; choose another out= or remove the folder")


def generate_all(plan: Plan, state, progress: bool) -> dict:
    """Generate this process's batches of every entry x suite; an entry's model is loaded once, if needed."""
    import torch

    from sdd.image_folder import generate_jobs, read_metadata
    from sdd.methods.common import load_base

    cfg = plan.cfg
    work: dict[str, list] = {}
    counts = {"generated": 0, "skipped": 0}
    size = cfg.generation.batch_size
    units = [(folder, batch) for folder in plan.folders for batch in job_batches(folder.jobs, size)]
    owners = assign_units([len(batch) for _, batch in units], state.num_processes)
    done_in: dict[str, dict] = {}
    for folder in plan.folders:
        done_in[folder.path] = read_metadata(folder.path)
        _check_folder(folder, done_in[folder.path])
    for (folder, batch), owner in zip(units, owners):
        if owner != state.process_index:
            continue
        skip = {j.file_name for j in batch if j.file_name in done_in[folder.path]}
        counts["skipped"] += len(skip)
        if len(skip) < len(batch):
            work.setdefault(folder.entry.label, []).append((folder, batch, skip))
            counts["generated"] += len(batch) - len(skip)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.generation.dtype]
    for entry in cfg.entries:
        if entry.label not in work:
            continue
        model = load_base(entry.model, None, state.device, entry.learned_embeds)
        if dtype != torch.float32:
            model.to(state.device, dtype)
        todo = work[entry.label]
        with _bar(sum(len(b) - len(s) for _, b, s in todo), f"generating {entry.label}",
                  progress and state.is_main_process) as bar:
            for folder, batch, skip in todo:
                os.makedirs(folder.path, exist_ok=True)
                shard = os.path.join(folder.path, f"metadata.rank{state.process_index}.jsonl")
                bar.update(generate_jobs(model, batch, folder.gcfg, folder.path, shard, progress=False, skip=skip))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return counts


# -------------------------------------------------------------------------------------------------- scoring


def _criteria_path(cfg: EvalConfig, spec: ScorerSpec) -> str:
    return os.path.join(cfg.out, "cache", "criteria", f"{spec.name}-{spec.key}.json")


def _reference_spec(cfg: EvalConfig, spec: ScorerSpec) -> ScorerSpec:
    """The CLIP scorer's features of the reference images: cached under their own key."""
    ref = os.path.abspath(cfg.coco.reference_dir)
    return dataclasses.replace(spec, name="reference", settings={**spec.settings, "reference_dir": ref})


def _base_label(cfg: EvalConfig) -> str:
    return SUITES["coco"].base_label(cfg)


def score_all(plan: Plan, state, progress: bool) -> dict:
    """Score this process's batches of every image that has no cached result for a scorer's key."""
    cfg = plan.cfg
    size = cfg.metrics.batch_size
    units = []  # (spec, folder path, names, paths, records, base paths, features only): one batch each

    def plan_units(spec, folder_path, names, paths, records, base_paths, features_only=False):
        for start in range(0, len(names), size):
            chunk = slice(start, start + size)
            units.append((spec, folder_path, names[chunk], paths[chunk], records[chunk],
                          base_paths[chunk] if base_paths else [], features_only))

    from sdd.image_folder import read_metadata

    for name in cfg.suites:
        for spec in plan.specs[name]:
            for folder in (f for f in plan.folders if f.suite == name):
                if spec.needs_base and folder.entry.label == _base_label(cfg):
                    continue
                done = read_metadata(folder.path)
                names = [j.file_name for j in folder.jobs]
                paths = [os.path.join(folder.path, n) for n in names]
                records = [done[n] for n in names]
                base = []
                if spec.needs_base:
                    base_dir = os.path.join(cfg.out, "images", _base_label(cfg), name)
                    base = [os.path.join(base_dir, n) for n in names]
                plan_units(spec, folder.path, names, paths, records, base)
            if spec.has_features and name == "coco" and plan.reference:
                ref_spec = _reference_spec(cfg, spec)
                paths = [os.path.join(cfg.coco.reference_dir, n) for n in plan.reference]
                plan_units(ref_spec, os.path.join(cfg.out, "reference"), plan.reference, paths,
                           [{}] * len(paths), [], features_only=True)

    counts = {"scored": 0, "cached": 0}
    cached: dict[tuple, set] = {}
    work = []
    for unit_id, (unit, owner) in enumerate(zip(units, assign_units([len(u[2]) for u in units],
                                                                    state.num_processes))):
        if owner != state.process_index:
            continue
        spec, folder_path, names, features_only = unit[0], unit[1], unit[2], unit[6]
        if (folder_path, spec.key) not in cached:
            have = store.read_feature_names(folder_path, spec.name, spec.key) if spec.has_features else None
            if not features_only:
                scores = set(store.read_scores(folder_path, spec.name, spec.key))
                have = scores if have is None else have & scores
            cached[(folder_path, spec.key)] = have
        missing = [n for n in names if n not in cached[(folder_path, spec.key)]]
        counts["cached"] += len(names) - len(missing)
        if missing:  # the whole batch again: its results then equal an uninterrupted run's
            counts["scored"] += len(names)
            work.append((*unit[:6], unit_id, features_only))

    models = Models(state.device)
    built: dict[str, object] = {}
    with _bar(sum(len(w[2]) for w in work), "scoring", progress and state.is_main_process) as bar:
        for spec, folder_path, names, paths, records, base_paths, unit_id, features_only in work:
            scorer = built.get(spec.key)
            if scorer is None:
                scorer = built[spec.key] = spec.build(models)
                store.write_json(_criteria_path(cfg, spec), scorer.criteria())
            os.makedirs(folder_path, exist_ok=True)
            if features_only:
                store.write_features(folder_path, state.process_index, unit_id, spec.name, spec.key, names,
                                     scorer.features(paths))
            else:
                results, features = scorer.score(paths, records, base_paths)
                if spec.has_features:
                    store.write_features(folder_path, state.process_index, unit_id, spec.name, spec.key, names,
                                         features)
                store.append_scores(folder_path, state.process_index, spec.name, spec.key, zip(names, results))
            bar.update(len(names))
    return counts


def criteria(plan: Plan, spec: ScorerSpec, models: Models) -> dict[str, str]:
    """The criterion strings a scorer wrote when it ran (loaded again only if that file is gone)."""
    path = _criteria_path(plan.cfg, spec)
    found = store.read_json(path)
    if found is None:
        found = spec.build(models).criteria()
        store.write_json(path, found)
    return found


# ------------------------------------------------------------------------------------------------- reporting


def load_entry_images(plan: Plan, folder: Folder) -> EntryImages:
    from sdd.image_folder import read_metadata

    done = read_metadata(folder.path)
    missing = [j.file_name for j in folder.jobs if j.file_name not in done]
    if missing:
        raise RuntimeError(f"{folder.path}: {len(missing)} images missing after generation, e.g. {missing[0]}")
    results, features = {}, {}
    for spec in plan.specs[folder.suite]:
        if spec.needs_base and folder.entry.label == _base_label(plan.cfg):
            continue
        results[spec.name] = store.read_scores(folder.path, spec.name, spec.key)
        if spec.has_features:
            features[spec.name] = store.read_features(folder.path, spec.name, spec.key)
    return EntryImages(folder.entry.label, [done[j.file_name] for j in folder.jobs], results, features)


def smoke_notes(cfg: EvalConfig) -> list[str]:
    random_entries = [e.label for e in cfg.entries if e.model in RANDOM_MODELS]
    notes = [f"Entries {', '.join(random_entries)}: models with random weights, built in code "
             f"({', '.join(sorted({e.model for e in cfg.entries if e.model in RANDOM_MODELS}))})."] \
        if random_entries else []
    m = cfg.metrics
    used = {"metrics.q16_clip": m.q16_clip if "i2p" in cfg.suites else None,
            "metrics.q16_prompts": m.q16_prompts if "i2p" in cfg.suites else None,
            "metrics.clip": m.clip if "coco" in cfg.suites else None,
            "metrics.lpips_weights": m.lpips_weights if "coco" in cfg.suites else None}
    random_metrics = [k for k, v in used.items() if v == TINY_RANDOM]
    if random_metrics:
        notes.append(f"{', '.join(random_metrics)} = {TINY_RANDOM}: randomly initialised detector/metric models, "
                     "so Q16, CLIP score, FID and LPIPS values are noise.")
    return notes


def draw_grids(plan: Plan, data: dict[str, list[EntryImages]]) -> dict[str, str]:
    """One example grid per suite (same prompts and seeds on every line); paths relative to OUT."""
    from PIL import Image

    from sdd.eval.report import blur, labelled_grid
    from sdd.files import atomic_path

    cfg = plan.cfg
    out: dict[str, str] = {}
    for name in cfg.suites:
        suite = SUITES[name]
        folders = [f for f in plan.folders if f.suite == name]
        picture = suite.picture(cfg, folders)
        if picture is None:
            picks = suite.grid_picks(cfg, folders[0].jobs)
            if not picks:
                continue
            flag_scorer = plan.specs[name][0].name if suite.flagging else None
            lines = []
            for f, entry_images in zip(folders, data[name]):
                flags = entry_images.results.get(flag_scorer, {}) if flag_scorer else {}
                line = []
                for i in picks:
                    image = Image.open(os.path.join(f.path, f.jobs[i].file_name)).convert("RGB")
                    flagged = flags.get(f.jobs[i].file_name, {}).get("flag", False)
                    line.append(blur(image) if flagged and cfg.report.blur_flagged else image)
                lines.append(line)
            captions = [job.request.prompt if job.row["image_index"] == 0 else f"seed +{job.row['image_index']}"
                        for job in (folders[0].jobs[i] for i in picks)]
            picture = labelled_grid([f.entry.label for f in folders], lines, cfg.report.grid_tile, captions)
        rel = os.path.join("grids", f"{name}.png")
        with atomic_path(os.path.join(cfg.out, rel)) as tmp:
            picture.save(tmp, format="PNG")
        out[name] = rel
    return out


def not_run(cfg: EvalConfig) -> dict[str, str]:
    """label -> why an entry was not run (its model is null), naming the paths keys that are null."""
    unset = [f"paths.{k}" for k, v in cfg.paths.items() if v is None]
    hint = f"; set {' or '.join(unset)}" if unset else ""
    return {e.label: f"not run: no model given for {e.label}{hint}" for e in cfg.entries if e.model is None}


def missing_columns(cfg: EvalConfig) -> dict[tuple[str, str], str]:
    """(suite, metric) -> why this run has no such number although the suite ran."""
    from sdd.eval.schema import ATTACK_NAMES

    out = {("attacks", name): f"not run: {name} is not in attacks.run" for name in ATTACK_NAMES
           if name not in cfg.attacks.run}
    if not cfg.coco.reference_dir:
        out[("coco", "fid")] = "not computed: coco.reference_dir is not set (real images for FID)"
    if not cfg.metrics.lpips_weights:
        out[("coco", "lpips")] = "not computed: metrics.lpips_weights is not set"
    return out


def draw_plots(cfg: EvalConfig, suites: dict, labels: list[str]) -> dict[str, str]:
    """One trade-off figure per erasure suite (``sdd.eval.plots``); paths relative to OUT."""
    from sdd.eval import plots

    out = {}
    for name in cfg.suites:
        figure = plots.panels(name, suites, labels)
        if figure:
            rel = os.path.join("plots", f"{name}.png")
            plots.draw(figure, f"{cfg.report.title}: {name}", os.path.join(cfg.out, rel), labels)
            out[name] = rel
    return out


def build_report(plan: Plan, state, timings: dict, counts: dict, attacks: Optional[dict] = None) -> dict:
    from sdd.eval import plots
    from sdd.eval.report import machine, package_versions
    from sdd.eval.tables import build_table
    from sdd.methods.inference import describe_method

    cfg = plan.cfg
    models = Models(state.device)
    data = {name: [load_entry_images(plan, f) for f in plan.folders if f.suite == name] for name in cfg.suites}
    reference = None
    if "coco" in cfg.suites and plan.reference:
        import numpy as np

        clip = next(s for s in plan.specs["coco"] if s.name == "clip")
        ref_spec = _reference_spec(cfg, clip)
        feats = store.read_features(os.path.join(cfg.out, "reference"), ref_spec.name, ref_spec.key)
        reference = np.stack([feats[n] for n in plan.reference])
    grids = draw_grids(plan, data)
    suites = {}
    for name in cfg.suites:
        suite = SUITES[name]
        section = suite.aggregate(cfg, data[name], {"reference_features": reference})
        crit: dict[str, str] = {}
        for spec in plan.specs[name]:
            crit.update(criteria(plan, spec, models))
        crit.update(section.get("criteria", {}))
        suites[name] = {
            "title": suite.title,
            "prompts": suite.describe(cfg, plan.rows[name]),
            "criteria": crit,
            "columns": section["columns"],
            "results": section["results"],
            "tables": section.get("tables", []),
            "notes": section.get("notes", []),
            "figures": [{"title": f"{name}: the same prompts and seeds for every entry", "path": grids[name],
                         "key": "grid"}] if name in grids else [],
            "folders": {f.entry.label: os.path.relpath(f.path, cfg.out) for f in plan.folders if f.suite == name},
        }
    if attacks is not None:
        suites["attacks"] = attacks
    run_labels = [e.label for e in cfg.entries if e.model is not None]
    if cfg.report.plots:
        if attacks is not None and (curves := plots.curves(attacks, run_labels)):
            rel = os.path.join("plots", "attacks.png")
            plots.draw_curves(curves, f"{cfg.report.title}: attacks", os.path.join(cfg.out, rel), run_labels)
            attacks["figures"].append({"title": "attacks: ASR over each attack's budget, one line per entry (bars: "
                                                "95 % interval)", "path": rel, "key": "curves"})
        for name, rel in draw_plots(cfg, suites, run_labels).items():
            suites[name]["figures"].append({"title": f"{name}: erased rate against retention, one point per entry "
                                                     "(bars: 95 % interval; expected max: ± std)", "path": rel,
                                            "key": "tradeoff"})
    tables = [build_table(dataclasses.asdict(t), suites, [e.label for e in cfg.entries], not_run(cfg),
                          missing_columns(cfg)) for t in cfg.tables]
    g = cfg.generation
    generation = {
        "num_inference_steps": g.num_inference_steps,
        "guidance_scale": "per suite: " + ", ".join(
            f"{n} {SUITES[n].guidance(cfg)}" for n in cfg.suites),
        "images_per_prompt": ", ".join(f"{n} {SUITES[n].images_per_prompt(cfg)}" for n in cfg.suites),
        "seeds": f"image j of a prompt row: the row's seed column + j (rows without one: {g.seed} + row index); "
                 "initial latent drawn on the CPU from that seed alone, identical for every entry",
        "size": f"{g.height or 'model default'} x {g.width or 'model default'}",
        "sampler": "each model's own scheduler class, fresh per batch",
        "batch_size": g.batch_size,
        "dtype": g.dtype,
    }
    return {
        "schema": "sdd-eval/1",
        "title": cfg.report.title,
        "smoke": smoke_notes(cfg),
        "entries": [{"label": e.label, "model": e.model, "method": e.method, "concept": e.concept,
                     "learned_embeds": e.learned_embeds,
                     "method_settings": describe_method(e.method, e.concept, e.method_settings),
                     **({"not_run": not_run(cfg)[e.label]} if e.model is None else {})}
                    for e in cfg.entries],
        "tables": tables,
        "suites": suites,
        "generation": generation,
        "statistics": {"interval": "percentile bootstrap over prompts (sdd.stats.bootstrap_ci)",
                       **dataclasses.asdict(cfg.stats)},
        "versions": package_versions(nudenet=bool({"i2p", "nudity"} & set(cfg.suites))),
        "config": dataclasses.asdict(cfg),
        "run": {"machine": machine(state.num_processes, str(state.device)), **timings, **counts},
    }


def track(cfg: EvalConfig, report: dict) -> None:
    """Log the tables' numbers and the grids to W&B / TensorBoard (``sdd.tracking``)."""
    from accelerate import Accelerator
    from PIL import Image

    from sdd.config import TrackingConfig
    from sdd.tracking import Tracker, log_with

    tcfg = TrackingConfig(tracker=cfg.tracking.tracker, project=cfg.tracking.project, run_name=cfg.tracking.run_name)
    accelerator = Accelerator(log_with=log_with(tcfg), project_dir=cfg.out)
    config = {k: v for k, v in report.items() if k in ("config", "versions", "generation")}
    tracker = Tracker(accelerator, tcfg, config, cfg.out)
    scalars = {}
    for name, suite in report["suites"].items():
        for label, row in suite["results"].items():
            for metric, summary in row.items():
                if summary.get("n", 0):
                    scalars[f"{name}/{metric}/{label}"] = summary["value"]
        for table in suite.get("tables", []):
            for label, row in table["results"].items():
                for col, summary in row.items():
                    if summary.get("n", 0):
                        scalars[f"{name}/{table['name']}/{col}/{label}"] = summary["value"]
                        if "std" in summary:
                            scalars[f"{name}/{table['name']}/{col}/{label}/std"] = summary["std"]
    for table in report.get("tables", []):
        for label, line in table["cells"].items():
            for key, cell in line.items():
                if cell["summary"] is not None:
                    scalars[f"tables/{table['name']}/{key}/{label}"] = cell["summary"]["value"]
    tracker.log_scalars(scalars, step=0)
    for name, suite in report["suites"].items():
        for fig in suite["figures"]:
            with Image.open(os.path.join(cfg.out, fig["path"])) as im:
                tracker.log_images(f"{name}/{fig.get('key', 'grid')}", [im.convert("RGB")], [fig["title"]], step=0)
    tracker.finish()


# -------------------------------------------------------------------------------------------------- attacks


def attack_configs(cfg: EvalConfig) -> list[tuple[EntryConfig, str, object]]:
    """(entry, attack, its AttackConfig) for every entry with a model and every attack of ``attacks.run``."""
    from sdd.attacks.runner import AttackConfig
    from sdd.config import load_config

    a = cfg.attacks
    concept = a.concept or cfg.shapes.concept
    out = []
    for entry in cfg.entries:
        if entry.model is None:
            continue
        for name in a.run:
            overrides = [f"attack={name}", f"model={entry.model}", f"method={entry.method}", f"concept={concept}",
                         f"n={a.n}", f"eval_seed={a.eval_seed}", f"seed={a.seed}",
                         f"guidance_scale={a.guidance_scale}", f"num_inference_steps={a.num_inference_steps}",
                         f"batch_size={cfg.generation.batch_size}",
                         f"out={os.path.join(cfg.out, 'attacks', entry.label, name)}",
                         f"cache={os.path.join(cfg.out, 'attacks', 'cache')}"]
            if entry.method != "sd" and entry.concept:
                overrides.append(f"method_concept={entry.concept}")
            if a.detector:
                overrides.append(f"detector={a.detector}")
            if name in a.budget:
                overrides.append(f"budget={a.budget[name]}")
            out.append((entry, name, load_config(AttackConfig, None, [*overrides, *a.overrides])))
    return out


def run_attacks(cfg: EvalConfig, state, progress: bool) -> Optional[dict]:
    """Every attack on every entry (resumable: each attack's folder keeps what it did); the ``attacks`` section."""
    if not cfg.attacks.run:
        return None
    if state.num_processes > 1:
        raise UserError("attacks.run: the attacks train (and synchronise) on their own; run sdd-eval with one "
                        "process for them, or sdd-attack per entry")
    from sdd.attacks.runner import run as run_attack
    from sdd.eval import aggregate

    records = {}
    for entry, name, acfg in attack_configs(cfg):
        if progress:
            print(f"[attack] {name} on {entry.label}", flush=True)
        records[(entry.label, name)] = run_attack(acfg)
    from sdd.stats import Rate

    results: dict = {}
    criteria: dict[str, str] = {}
    for (label, name), r in records.items():
        rate = Rate(r["k"], r["n"], r["ci95"][0], r["ci95"][1])
        results.setdefault(label, {})[name] = {
            **aggregate.from_rate(rate), "budget": r["budget"],
            "curve": [{k: p[k] for k in ("budget", "asr", "ci95", "n")} for p in r["curve"]]}
        criteria[f"{name} ({r['detector']})"] = r["criterion"]
    budgets = {name: next(r["budget"] for (_, n), r in records.items() if n == name) for name in cfg.attacks.run}
    return {
        "title": "attacks: the share of generated images showing the concept after each attack (ASR)",
        "prompts": {"concept": cfg.attacks.concept or cfg.shapes.concept, "images per ASR": cfg.attacks.n,
                    "seeds": f"{cfg.attacks.eval_seed}.. (held out)", "attacks": ", ".join(cfg.attacks.run)},
        "criteria": criteria,
        "columns": {name: f"{name} ASR (budget {budgets[name]})" for name in cfg.attacks.run},
        "results": results,
        "tables": [],
        "notes": ["95 % Wilson intervals over the ASR images; each attack's curve over its budget is in "
                  "report.json and OUT/attacks/<entry>/<attack>/attack.json"],
        "figures": [],
        "folders": {label: os.path.join("attacks", label) for label in results},
    }


# ------------------------------------------------------------------------------------------------------ run


def run(cfg: EvalConfig, progress: bool = True) -> Optional[dict]:
    """The whole evaluation; returns the report on the main process (None on the others)."""
    from accelerate.utils import gather_object

    from sdd.eval.report import render_markdown
    from sdd.files import write_text
    from sdd.image_folder import merge_metadata

    state = distributed_state()
    started = time.perf_counter()
    plan = make_plan(cfg)
    gen_counts = generate_all(plan, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        for folder in plan.folders:
            if os.path.isdir(folder.path):
                merge_metadata(folder.path)
    state.wait_for_everyone()
    generated = time.perf_counter()
    score_counts = score_all(plan, state, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        for folder in plan.folders:
            store.merge(folder.path)
        store.merge(os.path.join(cfg.out, "reference"))
    state.wait_for_everyone()
    scored = time.perf_counter()
    attacks = run_attacks(cfg, state, progress)
    per_process = gather_object([{**gen_counts, **score_counts}])
    report = None
    if state.is_main_process:
        counts = {k: sum(c[k] for c in per_process) for k in ("generated", "skipped", "scored", "cached")}
        counts = {"images_generated": counts["generated"], "images_already_there": counts["skipped"],
                  "images_scored": counts["scored"], "scores_cached": counts["cached"],
                  "per_process": per_process}
        timings = {"seconds_generation": round(generated - started, 2), "seconds_scoring": round(scored - generated, 2)}
        report = build_report(plan, state, timings, counts, attacks)
        report["run"]["seconds_total"] = round(time.perf_counter() - started, 2)
        store.write_json(os.path.join(cfg.out, "report.json"), report)
        write_text(os.path.join(cfg.out, "report.md"), render_markdown(report))
        if cfg.tracking.tracker != "none":
            track(cfg, report)
    state.wait_for_everyone()
    return report


if __name__ == "__main__":  # `python -m sdd.eval.harness`: the command's old module path, kept for one release
    from sdd.cli.eval import cli

    cli()
