"""The Python API: everything the framework does, one documented call each. The command-line tools (``sdd.cli``,
``train/*.py``) parse their arguments and call these, so a notebook gets exactly what a command gets.

    from sdd import api

    run = api.train("configs/sdd/tiny.yaml", "output_dir=outputs/tiny", "train.steps=20")   # any method's config
    pipe = api.load_pipeline(run.output_dir)                       # the erased model, a diffusers pipeline
    images = api.generate(run.output_dir, ["a photo of a cat"], seed=0)                     # PIL images
    api.generate("shapes", "country_body", method="sld-max", concept="nudity", out="outputs/imgs")  # a folder
    bench = api.benchmark({"base": "shapes", "sdd": "outputs/sdd-shapes-red"}, concept="red")        # ShapesWorld
    report = api.evaluate("configs/eval/tiny.yaml", "out=outputs/eval-tiny")                # sdd-eval
    api.export("outputs/tiny", "sdd.export=student", out="outputs/tiny-student")             # sdd-export

Errors a user can cause raise ``sdd.errors.UserError`` with one line naming the key, path or value.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Mapping, Optional, Sequence, Union

from sdd import card
from sdd.config import load_config, merge_overrides
from sdd.errors import UserError
from sdd.loop import FitResult
from sdd.methods import registry
from sdd.methods.registry import entry

PathLike = Union[str, os.PathLike]


# --- training ------------------------------------------------------------------------------------------------


def run_config(config: Any = None, overrides: Sequence[str] = (), method: Optional[str] = None):
    """A validated run config: a YAML file (its ``method`` key, or ``method=``, names the method), a config object
    (overrides are applied to it), or nothing (``method=`` with its defaults), then ``key=value`` overrides."""
    import dataclasses

    import yaml

    if config is not None and dataclasses.is_dataclass(config):
        return merge_overrides(config, overrides)
    if config is not None:
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise UserError(f"config error: --config: no such file: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                named = (yaml.safe_load(f) or {}).get("method") if method is None else method
            except yaml.YAMLError:
                named = method  # load_config names the syntax error
        name = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), named)
        return load_config(entry(name or method, f"{path}: method").schema, path, overrides)
    return load_config(entry(method).schema, None, overrides)


def train(config: Any = None, *overrides: str, method: Optional[str] = None) -> FitResult:
    """Train a method from its config (see ``run_config``) and export it; return the run's result
    (``output_dir``, ``steps``, ``final_loss``, ``exports``: kind -> path, ``summary``: the method's own numbers).

    Runs on the processes of an ``accelerate launch`` as on one CPU. An interrupted run continues with
    ``train.resume=latest``. Every check (config, output folder, an earlier run there) passes before a model is built.
    """
    return registry.train(run_config(config, overrides, method))


def export(run_dir: PathLike, *overrides: str, checkpoint: str = "latest", out: Optional[PathLike] = None
           ) -> dict[str, str]:
    """Export a checkpoint of a run again (any method that exports a model): ``checkpoint`` is ``latest``, a
    ``step-NNNNNN`` name or a folder; ``overrides`` change the run's settings (``export.dtype=fp16``,
    ``sdd.export=student``); ``out`` defaults to the run folder. Returns kind -> path."""
    run_dir = os.fspath(run_dir)
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise UserError(f"{run_dir} is not a training run folder (no config.yaml)")
    cfg = run_config(config_path, [*overrides, "tracking.tracker=none"])
    return registry.export_checkpoint(cfg, run_dir, checkpoint, os.fspath(out) if out is not None else run_dir)


# --- models and images ---------------------------------------------------------------------------------------


def load_pipeline(model: PathLike, *, learned_embeds: Optional[PathLike] = None, device: str = "cpu"):
    """The diffusers pipeline of ``model``, its family's (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline``, ``FluxPipeline``): a training run folder (its ``pipeline/``; a LoRA run without
    one: the base model with ``lora/`` loaded; an HFI run: the base model with its token), a pipeline folder,
    ``tiny``, ``shapes`` or a hub id. ``learned_embeds`` adds a learned token."""
    import yaml

    from sdd.models import load_components

    model = os.fspath(model)
    lora = token = None
    is_run = os.path.isfile(os.path.join(model, "config.yaml"))
    if is_run and not os.path.isfile(os.path.join(model, "model_index.json")):
        if os.path.isdir(os.path.join(model, "pipeline")):
            model = os.path.join(model, "pipeline")
        else:
            with open(os.path.join(model, "config.yaml"), encoding="utf-8") as f:
                run = yaml.safe_load(f) or {}
            base = (run.get("model") or {}).get("pretrained")
            if not base:
                raise UserError(f"{model}: this run exported no model (no pipeline/ and no base model in config.yaml)")
            if os.path.isfile(os.path.join(model, "lora", "pytorch_lora_weights.safetensors")):
                lora = os.path.join(model, "lora")
            if os.path.isfile(os.path.join(model, "learned_embeds.safetensors")):
                token = os.path.join(model, "learned_embeds.safetensors")
            if lora is None and token is None:
                raise UserError(f"{model}: no pipeline/, lora/ or learned_embeds.safetensors in this run folder")
            model = base
    c = load_components(model)
    pipe = c.family.pipeline(c)  # the family's stock pipeline (StableDiffusionPipeline, ..., FluxPipeline)
    if lora is not None:
        pipe.load_lora_weights(lora)
    for path in (token, learned_embeds):
        if path is not None:
            pipe.load_textual_inversion(os.fspath(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(model: Any, prompts: Union[Sequence[str], str, None] = None, *, out: Optional[PathLike] = None,
             method: str = "sd", concept: Optional[str] = None, learned_embeds: Optional[PathLike] = None,
             seed: int = 0, images_per_prompt: int = 1, guidance_scale: float = 7.5, num_inference_steps: int = 25,
             height: Optional[int] = None, width: Optional[int] = None, batch_size: int = 4,
             settings: Optional[Mapping[str, Any]] = None, progress: bool = False):
    """Images of ``prompts`` (a list, or a prompt CSV / suite name such as ``i2p``) from ``model`` (as
    ``load_pipeline`` takes it) with ``method`` (``sd``, ``neg``, ``sld-weak`` ... ``sld-max``, ``sega``,
    ``safree``) steering away from ``concept``. Image j of prompt row r has seed ``row seed + j`` (``seed + r`` for
    rows without one).

    Without ``out``: the PIL images, in order. With ``out``: a resumable ``datasets`` image folder (PNG +
    ``metadata.jsonl``; shared over the processes of an ``accelerate launch``) and a summary dict. ``model`` may
    also be a ``sdd.image_folder.GenerateConfig``, which says all of it (what ``sdd-generate`` passes).
    """
    from sdd.image_folder import GenerateConfig, make_jobs, method_name, prompt_rows, run

    if isinstance(model, GenerateConfig):
        cfg = model
    else:
        listed = [] if prompts is None or isinstance(prompts, str) else list(prompts)
        given = {"model": _model_path(model), "method": method, "concept": concept, "prompt": listed,
                 "prompts": prompts if isinstance(prompts, str) else None, "seed": seed,
                 "images_per_prompt": images_per_prompt, "guidance_scale": guidance_scale,
                 "num_inference_steps": num_inference_steps, "height": height, "width": width,
                 "batch_size": batch_size, "method_settings": dict(settings or {}),
                 "learned_embeds": os.fspath(learned_embeds) if learned_embeds else None}
        if out is not None:
            given["out"] = os.fspath(out)
        if method.startswith("sld-"):  # the folder's config names SLD as method + preset
            given["method"], given["sld_preset"] = "sld", method.removeprefix("sld-")
        cfg = GenerateConfig(**given)
        if out is None:
            from sdd.methods.common import load_base
            from sdd.methods.inference import generate_with_method

            jobs = make_jobs(prompt_rows(cfg), cfg)
            components = load_base(cfg.model, None, "cpu", cfg.learned_embeds)
            return generate_with_method(components, [j.request for j in jobs], method_name(cfg), cfg.concept,
                                        settings=cfg.method_settings, num_inference_steps=cfg.num_inference_steps,
                                        batch_size=cfg.batch_size, progress=progress)
    return run(cfg, progress=progress)


def _model_path(model: PathLike) -> str:
    """A run folder stands for its exported pipeline (generation loads components, not run folders)."""
    from sdd.models import pipeline_path

    return pipeline_path(os.fspath(model))


# --- measuring -----------------------------------------------------------------------------------------------


def benchmark(models: Union[Mapping[str, str], Sequence[str]], concept: Union[str, Sequence[str]] = "red", *,
              out: Optional[PathLike] = None, n: int = 96, n_retention: int = 192, num_inference_steps: int = 25,
              guidance_scale: float = 5.0, seed: int = 0, batch_size: int = 64, progress: bool = False,
              learned_embeds: Optional[PathLike] = None) -> dict:
    """The ShapesWorld erasure benchmark (``sdd-shapes bench``) of ``models`` on the same seeds.

    ``models``: label -> ``PATH[@METHOD[:TEXT]]`` (``shapes``, ``tiny``, a pipeline or run folder; METHOD a
    generation method, ``sd`` by default; TEXT what it steers away from, by default the concepts' words), or a list
    of ``[LABEL=]PATH[@METHOD[:TEXT]]`` (unlabelled ones are named by the spec). ``learned_embeds``: a file whose
    token a TEXT may name (``neg:<warning-hf>``). ``concept`` may also be a feedback-defined concept (``warning``).
    Returns the report: ``rows`` with each model's rates and 95 % Wilson intervals (``erased_rate``, ``bare_rate``,
    ``kept``, ``retention_colour``, ``retention_shape``); with ``out``, ``bench.json`` and ``grid.png`` are written
    there. ``concept``: one, or several at once (a list, or joined by "+"): each gets its own rates, named
    ``erased_rate:red`` etc., and retention holds only prompts with none of them.
    """
    from sdd.shapes import bench

    if not isinstance(concept, str):
        concept = "+".join(concept)

    if isinstance(models, Mapping):
        specs = list(models.items())
    else:
        specs = [(label or None, rest) for label, _, rest in (m.rpartition("=") for m in models)]
    rows = []
    for label, spec in specs:
        path, at, how = spec.partition("@")
        rows.append(bench.parse_row(label or spec, _model_path(path) + at + how))
    settings = bench.settings_for(concept, n=n, n_retention=n_retention, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    if learned_embeds is not None and not os.path.isfile(learned_embeds):
        raise UserError(f"--learned-embeds: no such file: {learned_embeds}")
    report = bench.run(rows, settings, os.fspath(out) if out is not None else None, progress=progress,
                       learned_embeds=os.fspath(learned_embeds) if learned_embeds is not None else None)
    for (_, spec), row in zip(specs, report["rows"]):
        concept_args = " ".join(f"--concept {c}" for c in concept.split("+"))
        embeds = f" --learned-embeds {shlex.quote(os.fspath(learned_embeds))}" if row.get("text") and learned_embeds \
            else ""
        command = (f"sdd-shapes bench --model {shlex.quote(row['label'] + '=' + spec)} {concept_args} --n {n} "
                   f"--n-retention {n_retention} --steps {num_inference_steps} --guidance {guidance_scale} "
                   f"--seed {seed}{embeds}")
        how = row["method"] + (f":{row['text']}" if row.get("text") else "")
        card.record(spec.partition("@")[0], f"bench/{concept}/{how}/cfg{guidance_scale:g}/seed{seed}",
                    card.bench_evaluation(report, row, command))
    return report


def race(configs: Union[Mapping[str, PathLike], Sequence[PathLike]], concept: Union[str, Sequence[str]] = "red", *,
         seeds: Sequence[int] = (0,), out: PathLike = "outputs/race", every: int = 50, max_rate: float = 0.05,
         band: float = 0.01, min_kept: float = 0.0, curve: bool = False, n: int = 96, n_retention: int = 192,
         num_inference_steps: int = 25, guidance_scale: float = 5.0, eval_seed: int = 0, batch_size: int = 64,
         progress: bool = False) -> dict:
    """Time to a target erasure on ShapesWorld (``sdd-shapes race``, :mod:`sdd.shapes.race`): each training config
    (label -> YAML, or a list of ``[LABEL=]PATH``; the first is the reference) trained on each seed, its checkpoints
    benchmarked until one meets the target; seconds to target and the ratio against the reference. Writes
    ``race.json`` and ``race.md`` to ``out``; returns the report."""
    from sdd.shapes import bench
    from sdd.shapes import race as racing

    if not isinstance(concept, str):
        concept = "+".join(concept)
    if isinstance(configs, Mapping):
        specs = [(label, os.fspath(path)) for label, path in configs.items()]
    else:
        specs = []
        for spec in map(os.fspath, configs):
            label, _, path = spec.rpartition("=")
            specs.append((label or os.path.splitext(os.path.basename(path))[0], path))
    runs = [(label, run_config(path)) for label, path in specs]
    settings = bench.settings_for(concept, n=n, n_retention=n_retention, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, seed=eval_seed, batch_size=batch_size)
    target = racing.Target(max_rate=max_rate, band=band, min_kept=min_kept)
    return racing.race(runs, concept, list(seeds), target, every, settings, os.fspath(out), curve=curve,
                       progress=progress)


def evaluate(config: Any, *overrides: str, progress: bool = True) -> Optional[dict]:
    """``sdd-eval``: entries x suites from an eval config (a YAML of ``sdd.eval.schema.EvalConfig`` or the object),
    with overrides (``paths.sdd=OUT/pipeline``). Writes ``OUT/report.{json,md}``, grids and plots; returns the
    report on the main process (None on the others of an ``accelerate launch``)."""
    import dataclasses

    from sdd.eval.harness import run
    from sdd.eval.schema import EvalConfig, check_overrides

    check_overrides(overrides)
    if dataclasses.is_dataclass(config):
        cfg = merge_overrides(config, overrides)
    else:
        cfg = load_config(EvalConfig, os.fspath(config) if config is not None else None, overrides)
    report = run(cfg, progress=progress)
    if report is not None:
        for entry in cfg.entries:
            if entry.model is not None:
                card.record(entry.model, f"eval/{cfg.report.title}/{entry.label}", _eval_evaluation(report, entry,
                                                                                                   cfg.out))
    return report


def _eval_evaluation(report: dict, entry, out: str) -> dict:
    """The card record of one entry of an ``sdd-eval`` report: every column of every suite for its row."""
    metrics, criteria = [], []
    for name, suite in report["suites"].items():
        for key, title in suite["columns"].items():
            summary = suite["results"].get(entry.label, {}).get(key)
            if summary and summary.get("value") is not None:
                metrics.append({"type": f"{name}/{key}", "name": f"{name}: {title}", "value": summary["value"],
                                "ci95": [summary["lo"], summary["hi"]] if summary.get("lo") is not None else None,
                                "n": summary.get("n")})
        criteria += [f"{k}: {v}" for k, v in suite["criteria"].items()]
    return {"title": f"sdd-eval: {report['title']} ({entry.label}, {entry.method})",
            "dataset": {"name": report["title"], "type": "sdd-eval/" + "+".join(report["suites"])},
            "metrics": metrics, "criterion": "; ".join(criteria),
            "command": f"sdd-eval (report {os.path.join(out, 'report.json')})"}


def speed(method: str = "sdd", *, preset: str = "tiny", finetunes: Sequence[str] = ("xattn",),
          batch_sizes: Sequence[int] = (1,), precisions: Sequence[str] = ("fp32",), ddim_steps: int = 50,
          switches: str = "all", teacher_bf16: bool = False, compile: bool = False, processes: int = 1,
          iters: int = 10, warmup: int = 2, seed: int = 0, threads: Optional[int] = None,
          out: Optional[PathLike] = None, command: str = "", progress: bool = True) -> dict:
    """``sdd-bench``: training-step speed and memory of ``method`` against the reference loop (``sdd.speed``),
    each case in its own process. Returns ``{"rows", "table", "machine", ...}``; with ``out``, the JSON."""
    from sdd import speed as speed_bench

    if method not in ("sdd", "esd"):
        raise UserError(f"--method: the speed tables are for sdd and esd, got {method!r} (any method is timed "
                        "through the protocol with sdd.speed.time_steps)")
    case_list = speed_bench.cases(method, preset, tuple(finetunes), tuple(batch_sizes), tuple(precisions),
                                  ddim_steps, switches, teacher_bf16, compile, processes)
    return speed_bench.run(case_list, iters, warmup, seed, threads, os.fspath(out) if out else None, command,
                           progress)


def attack(model: PathLike, concept: str = "red", attack: str = "concept-inversion", *overrides: str,
           budget: Optional[int] = None, seed: int = 0, out: Optional[PathLike] = None,
           progress: bool = False) -> dict:
    """``sdd-attack``: attack ``model`` (a run or pipeline folder, ``shapes``, ``tiny``, a hub id) to bring
    ``concept`` back, with ``attack`` (``concept-inversion``, ``prompt-search``, ``ring-a-bell``, ``relearn``,
    ``static``) within ``budget`` (the attack's unit; default its paper's), and measure the attack success rate.
    ``overrides`` set any other key of ``sdd.attacks.runner.AttackConfig`` (``method=sld-max``,
    ``detector=nudenet``, ``inversion.lr=1e-2``, ``n=192``). Writes ``OUT/attack.json`` (and what the attack
    found, and its images); returns that record: ``asr``, ``ci95``, ``n``, ``budget``, ``curve``, ``found``."""
    from sdd.attacks.runner import AttackConfig, run

    given = [f"model={os.fspath(model)}", f"concept={concept}", f"attack={attack}", f"seed={seed}"]
    if budget is not None:
        given.append(f"budget={budget}")
    if out is not None:
        given.append(f"out={os.fspath(out)}")
    cfg = load_config(AttackConfig, None, [*given, *overrides])
    record = run(cfg, progress=(lambda m: print(m, flush=True)) if progress else None)
    card.record(cfg.model, f"attack/{cfg.attack}/{cfg.method}/{cfg.concept}/seed{cfg.seed}",
                card.attack_evaluation(record))
    return record
