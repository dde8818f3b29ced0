"""One attack on one model: the config, the run, the record (``OUT/attack.json``).

    sdd-attack --model OUT/pipeline --concept red --attack concept-inversion --budget 1000 --seed 0 --out DIR

Every attack follows the same path: check the inputs (one line on bad ones), find what it finds within its budget
(resumable: what is done is on disk), measure the attack success rate (ASR) at the points of its curve with held-out
seeds, and write ``attack.json``: ``{"attack", "asr", "ci95", "n", "budget", "curve": [{budget, asr, ci95, n}],
"found", "detector", "criterion", ...}``, the found tokens/prompts and the images under ``DIR``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

from sdd.attacks import common, inversion, prompt_search, relearn, ring_a_bell, static
from sdd.config import check
from sdd.errors import UserError
from sdd.files import check_writable_dir, write_json

ATTACKS = {
    "concept-inversion": inversion,
    "prompt-search": prompt_search,
    "ring-a-bell": ring_a_bell,
    "relearn": relearn,
    "static": static,
}
AttackName = Literal["concept-inversion", "prompt-search", "ring-a-bell", "relearn", "static"]


@dataclass
class AttackConfig:
    attack: AttackName = "concept-inversion"
    model: str = "shapes"  # the model under attack: a run folder, a pipeline folder, shapes, tiny or a hub id
    method: str = "sd"  # how it generates: sd, or an inference-time defence (neg, sld-weak..sld-max, sega, safree)
    method_concept: Optional[str] = None  # the text that defence steers away from (default: the concept)
    concept: str = "red"
    detector: Optional[str] = None  # shapes:CONCEPT, nudenet[:PRESET], q16:PROMPTS, i2p:PROMPTS (default: by concept)
    budget: Optional[int] = None  # the attack's unit (steps, generations, prompts); default: the attack's paper's
    curve: list[int] = field(default_factory=list)  # budget points of the ASR curve (default: the attack's)
    seed: int = 0  # the attack's own randomness
    n: int = 96  # images per ASR measurement
    eval_seed: int = 10000  # seed of the first measurement image (held out from the benchmarks' 0, 1, ...)
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    batch_size: int = 32
    images: Optional[str] = None  # images of the concept (a folder); default: rendered or the original's generations
    reference: Optional[str] = None  # the original model (default: the run's base model, from its config.yaml)
    out: str = "outputs/attack"
    cache: Optional[str] = None  # a folder where searches that do not depend on the attacked UNet are shared
    inversion: inversion.InversionSettings = field(default_factory=inversion.InversionSettings)
    prompt_search: prompt_search.PromptSearchSettings = field(default_factory=prompt_search.PromptSearchSettings)
    ring_a_bell: ring_a_bell.RingABellSettings = field(default_factory=ring_a_bell.RingABellSettings)
    relearn: relearn.RelearnSettings = field(default_factory=relearn.RelearnSettings)

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.budget is None or self.budget >= 0, "budget", "must be >= 0")
        check(bool(self.concept.strip()), "concept", "name the concept, e.g. --concept red")


def run(cfg: AttackConfig, progress=None) -> dict:
    """The attack of ``cfg``; returns (and writes) its record."""
    progress = progress or (lambda message: None)
    check_writable_dir(cfg.out, "--out")
    module = ATTACKS[cfg.attack]
    target = common.make_target(cfg)
    if target.shapes is False and cfg.detector and cfg.detector.startswith("shapes:"):
        judged = cfg.detector.partition(":")[2]
        raise UserError(f"--detector {cfg.detector} judges '{judged}', not the concept '{cfg.concept}'")
    budget = module.DEFAULT_BUDGET if cfg.budget is None else cfg.budget
    if budget < 1 and cfg.attack != "static":
        raise UserError(f"--budget: {cfg.attack} needs a budget >= 1")
    points = common.curve_points(budget, cfg.curve, module.DEFAULT_CURVE) if budget else [0]
    os.makedirs(cfg.out, exist_ok=True)
    started = time.perf_counter()
    result = module.attack(target, cfg, cfg.out, points, progress)
    last = result["curve"][-1]
    record = {
        "attack": cfg.attack,
        "asr": last["asr"], "ci95": last["ci95"], "k": last["k"], "n": last["n"], "budget": last["budget"],
        "curve": result["curve"],
        **{k: v for k, v in result.items() if k not in ("curve", "found")},
        "found": result["found"],
        "model": cfg.model, "method": cfg.method, "concept": cfg.concept,
        "detector": target.detector_name, "criterion": target.detector.criterion(),
        "seed": cfg.seed, "eval_seed": cfg.eval_seed, "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "settings": _settings(cfg),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(os.path.join(cfg.out, "attack.json"), record)
    return record


def _settings(cfg: AttackConfig) -> dict:
    import dataclasses

    section = {"concept-inversion": "inversion", "prompt-search": "prompt_search", "ring-a-bell": "ring_a_bell",
               "relearn": "relearn"}.get(cfg.attack)
    return dataclasses.asdict(getattr(cfg, section)) if section else {}
