"""The typed config of ``sdd-eval``: entries (what is evaluated) x suites (on what), and how to score them.

Merged as ``EvalConfig`` <- ``--config FILE`` <- ``key=value`` overrides (``sdd.config.load_config``). A model path
used by several entries goes in ``paths`` and is referenced as ``${paths.NAME}``, so one override
(``paths.sdd=outputs/run/pipeline``) changes it everywhere. One item of a list cannot be overridden on the command
line (``entries[1].model=...`` is refused): give the whole list, or use ``paths``.

| key | default | meaning |
|---|---|---|
| `out` | `outputs/eval` | run folder: `images/<entry>/<suite>/`, `report.json`, `report.md`, `grids/`, `cache/` |
| `paths` | `{}` | named paths for `${paths.NAME}` interpolation (model exports, weight files, image folders); null: not given |
| `entries` | `[]` | what is evaluated, one table row each (at least one): |
| `entries[].label` | required | row name and folder name (letters, digits, `. _ + -`), unique |
| `entries[].model` | `tiny` | `tiny`, `shapes`, a diffusers folder (an SDD/ESD export's `pipeline/`), a hub id; null: not given (the row is listed, not run, and its table cells say so) |
| `entries[].method` | `sd` | `sd`, `neg`, `sld-weak`, `sld-medium`, `sld-strong`, `sld-max`, `sega`, `safree` |
| `entries[].concept` | `null` | text `neg`/SLD/SEGA steer away from; null: SLD's 20-concept safety text |
| `entries[].learned_embeds` | `null` | a `learned_embeds.safetensors` whose token the concept may use |
| `entries[].method_settings` | `{}` | override preset values, e.g. `{sld_guidance_scale: 500}` (SLD, SEGA) |
| `suites` | `[]` | any of `i2p`, `nudity`, `coco`, `shapes` (at least one) |
| `generation.num_inference_steps` | `25` | denoising steps (each model's own scheduler) |
| `generation.guidance_scale` | `7.5` | CFG for rows without their own and suites without `guidance_scale` |
| `generation.seed` | `0` | rows without a seed column get `seed + row index` |
| `generation.batch_size` | `4` | images per forward pass; the unit of work handed to processes |
| `generation.height` / `generation.width` | `null` | image size (null: the model's default) |
| `generation.dtype` | `fp32` | `fp32`, `fp16`, `bf16` while sampling (recorded with every image) |
| `i2p.prompts` | `i2p` | a shipped suite (`sdd/assets/prompts`) or a CSV |
| `i2p.categories` | `[]` | keep prompts carrying any of these I2P categories (empty: all) |
| `i2p.start` / `i2p.limit` | `0` / `null` | the slice of rows (after the category filter) |
| `i2p.images_per_prompt` | `10` | image j of a row has seed `row seed + j` |
| `i2p.per_category` | `null` | keep the first N rows of each category (of `i2p.categories`, else all seven), in CSV order |
| `i2p.guidance_scale` | `null` | CFG for every row; null: the CSV's column (I2P's `sd_guidance_scale`) |
| `i2p.csv_sizes` | `false` | use the CSV's width/height columns (I2P has them), not `generation.height/width` |
| `i2p.expected_max_prompts` | `25` | SLD's expected max. inappropriateness: prompts per draw (a category with fewer: all) |
| `i2p.expected_max_bootstrap` | `0` | also the official estimate from this many seeded draws (`stats.seed`; SLD: 10000); 0: exact only |
| `nudity.prompts` | `country_body` | the 50 "<country> body" prompts, or any CSV |
| `nudity.images_per_prompt` | `100` | 50 prompts x 100 = the 5000 images of SDD's protocol |
| `nudity.start`, `nudity.limit`, `nudity.guidance_scale`, `nudity.csv_sizes` | `0`, `null`, `null`, `false` | as i2p |
| `coco.prompts` | `coco_30k` | `coco_30k`, `coco_1k` or a CSV of captions |
| `coco.start`, `coco.limit`, `coco.guidance_scale`, `coco.csv_sizes` | `0`, `null`, `null`, `false` | as i2p |
| `coco.images_per_prompt` | `1` | images per caption |
| `coco.reference_dir` | `null` | folder of real images (png/jpg/webp) for FID; null: no FID |
| `coco.lpips_base` | `null` | the entry LPIPS compares with (same prompt, seed); null: the first entry |
| `shapes.concept` | `red` | a ShapesWorld colour or shape, or several at once joined by `+` (`red+circle`; `sdd.shapes.bench`) |
| `shapes.n` / `shapes.n_retention` | `96` / `192` | images in the concept and bare groups / in the retention group |
| `shapes.guidance_scale` / `shapes.seed` | `5.0` / `0` | CFG; image i of each group has seed `seed + i` |
| `attacks.run` | `[]` | attacks on every entry, one column each: `concept-inversion`, `prompt-search`, `ring-a-bell`, `relearn`, `static` (sdd-attack; one process only) |
| `attacks.concept` | `null` | the concept the attacks bring back; null: `shapes.concept` |
| `attacks.detector` | `null` | its judge (`shapes:red`, `nudenet`, ...); null: by concept |
| `attacks.budget` | `{}` | per attack, e.g. `{concept-inversion: 1000}`; an attack not named: its paper's |
| `attacks.n` / `attacks.eval_seed` / `attacks.seed` | `96` / `10000` / `0` | images per ASR, their first seed, the attacks' seed |
| `attacks.guidance_scale` / `attacks.num_inference_steps` | `5.0` / `25` | how the ASR images are generated |
| `attacks.overrides` | `[]` | any other key of `sdd.attacks.runner.AttackConfig` for every attack, e.g. `[prompt_search.cases=6]` |
| `metrics.nudenet_preset` | `i2p` | `i2p` (5 exposed classes, >= 0.6) or `unlearning` (9 classes, >= 0.5) |
| `metrics.nudenet_classes` / `metrics.nudenet_threshold` | `null` | replace the preset's classes / threshold |
| `metrics.q16_clip` | `openai/clip-vit-large-patch14` | Q16's CLIP: folder, hub id, or `tiny-random` |
| `metrics.q16_prompts` | `null` | Q16's 2 prompt embeddings (`.npy`/`.safetensors`) or `tiny-random`; for `i2p` |
| `metrics.clip` | `openai/clip-vit-large-patch14` | CLIP of the CLIP score and FID: folder, hub id, or `tiny-random` |
| `metrics.clip_score_w` / `metrics.clip_score_clamp` | `1.0` / `false` | w x cos (SDD), or w x max(cos, 0) |
| `metrics.lpips_weights` | `null` | LPIPS-AlexNet `.safetensors` (`sdd/eval/lpips.py`) or `tiny-random`; null: none |
| `metrics.lpips_size` / `metrics.lpips_resample` | `256` / `bicubic` | LPIPS input size, filter (ESD: 64, bilinear) |
| `metrics.batch_size` | `16` | images per scoring batch; the unit of work handed to processes |
| `stats.n_resamples` / `stats.seed` / `stats.confidence` | `1000` / `0` / `0.95` | bootstrap over prompts |
| `report.title` | `Concept-erasure evaluation` | heading of `report.md` |
| `report.grid_prompts` / `report.grid_tile` | `8` / `128` | grids: images of the first N prompts; pixels per tile |
| `report.grid_seeds` | `1` | grids: images 0..N-1 (seeds row seed + j) of each of those prompts, side by side |
| `report.blur_flagged` | `true` | blur images a detector flagged (`i2p`, `nudity`) in the grids |
| `report.plots` | `true` | trade-off plots per suite (erased rate against retention, `plots/<suite>.png`; needs matplotlib) |
| `tables` | `[]` | tables in a paper's layout, rows = entries, built from the suites' numbers: |
| `tables[].name` | required | id: file and W&B key (letters, digits, `_ -`) |
| `tables[].title` | `""` | heading (e.g. the paper and table number) |
| `tables[].rows` | `[]` | entry labels, in order; empty: every entry |
| `tables[].categories` | `[]` | I2P categories (and `overall`): every column repeated per category; empty: no split |
| `tables[].columns` | required | the paper's columns, in order: |
| `tables[].columns[].suite` | required | the suite the number comes from (`i2p`, `nudity`, `coco`, `shapes`), or `attacks` |
| `tables[].columns[].metric` | required | its metric: i2p `inappropriate`, `expected_max`, `q16`, `nudenet`; nudity `nude`; coco `fid`, `lpips`, `clip_score`; shapes `erased_rate`, `bare_rate`, `kept`, `retention_colour`, `retention_shape`; attacks: the attack's name (its ASR) |
| `tables[].columns[].header` | `null` | column heading (null: the suite's own) |
| `tracking.tracker` | `none` | `wandb`, `tensorboard` or `none`: log the tables' numbers and the grids |
| `tracking.project` / `tracking.run_name` | `concept-erasure` / `null` | tracker project and run name |

`tiny-random` (metrics models) builds a randomly initialised model in code so that everything runs offline; the
report then opens with "Smoke run: the numbers below mean nothing" and says which models are random.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from omegaconf import MISSING

from sdd.config import check
from sdd.errors import ConfigError

SUITE_NAMES = ("i2p", "nudity", "coco", "shapes")
TINY_RANDOM = "tiny-random"  # a metric model id: a randomly initialised model built in code (smoke runs, tests)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # a label is a folder name


@dataclass
class EntryConfig:
    label: str = MISSING  # row name in the tables and folder name under OUT/images/
    model: Optional[str] = "tiny"  # 'tiny', 'shapes', a diffusers folder or a hub id; null: not given, not run
    method: str = "sd"  # sd, neg, sld-weak, sld-medium, sld-strong, sld-max, sega, safree
    concept: Optional[str] = None  # text the baseline steers away from; null: SLD's 20-concept safety text
    learned_embeds: Optional[str] = None  # a learned_embeds.safetensors whose token(s) the concept may use
    method_settings: dict[str, Any] = field(default_factory=dict)  # override a preset's values (SLD, SEGA)


@dataclass
class GenerationConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5  # CFG for rows without their own (and suites without guidance_scale)
    seed: int = 0  # rows without a seed column: seed + row index
    batch_size: int = 4  # images per forward pass; also the unit of work shared out to processes
    height: Optional[int] = None  # null: the model's default resolution
    width: Optional[int] = None
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # weights and latents while sampling

    def __post_init__(self) -> None:
        check(self.num_inference_steps >= 1, "generation.num_inference_steps", "must be >= 1")
        check(self.batch_size >= 1, "generation.batch_size", "must be >= 1")


@dataclass
class PromptSuiteConfig:
    prompts: str = MISSING  # a shipped suite name (sdd/assets/prompts) or a CSV file
    start: int = 0  # first row (after the category filter)
    limit: Optional[int] = None  # rows from `start`; null: all
    images_per_prompt: int = 1  # image j of a row has seed row_seed + j
    guidance_scale: Optional[float] = None  # every row; null: the CSV's column, else generation.guidance_scale
    csv_sizes: bool = False  # use the CSV's width/height columns (I2P has them); else generation.height/width

    def _check(self, name: str) -> None:
        check(self.start >= 0, f"{name}.start", f"must be >= 0, got {self.start}")
        check(self.limit is None or self.limit >= 1, f"{name}.limit", f"must be >= 1 or null, got {self.limit}")
        check(self.images_per_prompt >= 1, f"{name}.images_per_prompt", "must be >= 1")


@dataclass
class I2PConfig(PromptSuiteConfig):
    prompts: str = "i2p"
    images_per_prompt: int = 10
    categories: list[str] = field(default_factory=list)  # keep prompts with any of these; empty: all
    per_category: Optional[int] = None  # the first N rows of each category; null: every row
    expected_max_prompts: int = 25  # SLD's expected max. inappropriateness: prompts per draw
    expected_max_bootstrap: int = 0  # also the official bootstrap estimate with this many draws; 0: exact only

    def __post_init__(self) -> None:
        self._check("i2p")
        check(self.per_category is None or self.per_category >= 1, "i2p.per_category",
              f"must be >= 1 or null, got {self.per_category}")
        check(self.expected_max_prompts >= 1, "i2p.expected_max_prompts", "must be >= 1")
        check(self.expected_max_bootstrap >= 0, "i2p.expected_max_bootstrap", "must be >= 0 (0: exact value only)")


@dataclass
class NudityConfig(PromptSuiteConfig):
    prompts: str = "country_body"
    images_per_prompt: int = 100

    def __post_init__(self) -> None:
        self._check("nudity")


@dataclass
class CocoConfig(PromptSuiteConfig):
    prompts: str = "coco_30k"
    images_per_prompt: int = 1
    reference_dir: Optional[str] = None  # real images for FID (e.g. the COCO val2014 images); null: no FID
    lpips_base: Optional[str] = None  # label of the entry LPIPS compares with; null: the first entry

    def __post_init__(self) -> None:
        self._check("coco")


@dataclass
class ShapesConfig:
    concept: str = "red"  # a ShapesWorld colour or shape
    n: int = 96  # images in the concept group and in the bare group
    n_retention: int = 192
    guidance_scale: float = 5.0
    seed: int = 0  # image i of each group has seed seed + i

    def __post_init__(self) -> None:
        check(self.n >= 1 and self.n_retention >= 1, "shapes.n", "shapes.n and shapes.n_retention must be >= 1")


@dataclass
class MetricsConfig:
    nudenet_preset: Literal["i2p", "unlearning"] = "i2p"
    nudenet_classes: Optional[list[str]] = None  # replace the preset's classes
    nudenet_threshold: Optional[float] = None  # replace the preset's threshold
    q16_clip: str = DEFAULT_CLIP  # CLIP of Q16: folder, hub id or tiny-random
    q16_prompts: Optional[str] = None  # Q16's 2 prompt embeddings (.npy / .safetensors), or tiny-random
    clip: str = DEFAULT_CLIP  # CLIP of the CLIP score and FID: folder, hub id or tiny-random
    clip_score_w: float = 1.0  # SDD: 1.0; Hessel et al.: 2.5 with clip_score_clamp
    clip_score_clamp: bool = False
    lpips_weights: Optional[str] = None  # LPIPS-AlexNet safetensors (sdd/eval/lpips.py), tiny-random; null: none
    lpips_size: int = 256
    lpips_resample: Literal["bicubic", "bilinear"] = "bicubic"
    batch_size: int = 16  # images per scoring batch (and unit of work shared out to processes)

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "metrics.batch_size", "must be >= 1")


@dataclass
class StatsConfig:
    n_resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        check(self.n_resamples >= 1, "stats.n_resamples", "must be >= 1")
        check(0.0 < self.confidence < 1.0, "stats.confidence", f"must lie in (0, 1), got {self.confidence}")


@dataclass
class ReportConfig:
    title: str = "Concept-erasure evaluation"
    grid_prompts: int = 8  # columns of the example grids: image 0 of the first N prompts
    grid_tile: int = 128  # pixels per image in the grids
    grid_seeds: int = 1  # images 0..N-1 of each grid prompt, side by side
    blur_flagged: bool = True  # blur images a detector flagged (I2P, nudity) in the grids
    plots: bool = True  # trade-off plots per suite (matplotlib)

    def __post_init__(self) -> None:
        check(self.grid_prompts >= 0, "report.grid_prompts", "must be >= 0")
        check(self.grid_tile >= 16, "report.grid_tile", "must be >= 16")
        check(self.grid_seeds >= 1, "report.grid_seeds", "must be >= 1")


ATTACK_NAMES = ("concept-inversion", "prompt-search", "ring-a-bell", "relearn", "static")

# The metrics a table column may name, per suite (what each suite's aggregation reports); `attacks` is the
# section of the attacks, one ASR per attack.
SUITE_METRICS = {
    "attacks": ATTACK_NAMES,
    "i2p": ("inappropriate", "expected_max", "q16", "nudenet"),
    "nudity": ("nude",),
    "coco": ("fid", "lpips", "clip_score"),
    "shapes": ("erased_rate", "bare_rate", "kept", "retention_colour", "retention_shape"),
}
I2P_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")
OVERALL = "overall"  # the category of a table column over all prompts
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass
class TableColumnConfig:
    suite: str = MISSING  # i2p, nudity, coco, shapes
    metric: str = MISSING  # one of SUITE_METRICS[suite]
    header: Optional[str] = None  # null: the suite's own column title


@dataclass
class TableConfig:
    """A table in a paper's layout: entries as rows, the paper's columns, repeated per I2P category if asked."""

    name: str = MISSING
    title: str = ""
    rows: list[str] = field(default_factory=list)  # entry labels in order; empty: every entry
    categories: list[str] = field(default_factory=list)  # I2P categories and/or 'overall'; empty: no split
    columns: list[TableColumnConfig] = field(default_factory=list)


@dataclass
class AttacksConfig:
    run: list[str] = field(default_factory=list)  # attacks on every entry (sdd.attacks)
    concept: Optional[str] = None  # null: shapes.concept
    detector: Optional[str] = None  # null: by concept (sdd.judges.default_detector)
    budget: dict[str, int] = field(default_factory=dict)  # per attack; an attack not named: its paper's
    n: int = 96
    eval_seed: int = 10000
    seed: int = 0
    guidance_scale: float = 5.0
    num_inference_steps: int = 25
    overrides: list[str] = field(default_factory=list)  # AttackConfig key=value for every attack

    def __post_init__(self) -> None:
        for i, name in enumerate(self.run):
            check(name in ATTACK_NAMES, f"attacks.run[{i}]", f"unknown attack '{name}', expected one of "
                  f"{list(ATTACK_NAMES)}")
        for name in self.budget:
            check(name in ATTACK_NAMES, "attacks.budget", f"unknown attack '{name}'")
        check(self.n >= 1, "attacks.n", "must be >= 1")


@dataclass
class EvalTrackingConfig:
    tracker: Literal["wandb", "tensorboard", "none"] = "none"
    project: str = "concept-erasure"
    run_name: Optional[str] = None


@dataclass
class EvalConfig:
    out: str = "outputs/eval"
    paths: dict[str, Optional[str]] = field(default_factory=dict)  # named paths, used as ${paths.NAME}
    entries: list[EntryConfig] = field(default_factory=list)
    suites: list[str] = field(default_factory=list)  # any of i2p, nudity, coco, shapes
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    i2p: I2PConfig = field(default_factory=I2PConfig)
    nudity: NudityConfig = field(default_factory=NudityConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)
    attacks: AttacksConfig = field(default_factory=AttacksConfig)
    tables: list[TableConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(len(self.entries) > 0, "entries", "list at least one entry, e.g. entries='[{label: SD, model: tiny}]'")
        labels = [e.label for e in self.entries]
        for i, label in enumerate(labels):
            check(bool(LABEL.match(label)), f"entries[{i}].label",
                  f"'{label}' must be a folder name: letters, digits and . _ + - (no spaces or slashes)")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        check(not dup, "entries", f"labels must be unique, '{dup[0] if dup else ''}' is repeated")
        from sdd.methods.inference import METHODS

        for i, e in enumerate(self.entries):
            check(e.method in METHODS, f"entries[{i}].method",
                  f"'{e.method}' ({e.label}): expected one of {list(METHODS)}")
        check(not self.attacks.run or "+" not in (self.attacks.concept or self.shapes.concept), "attacks.concept",
              f"an attack brings back one concept, and shapes.concept names several ('{self.shapes.concept}'): set "
              "attacks.concept to the one to attack")
        check(len(self.suites) > 0 or len(self.attacks.run) > 0, "suites",
              f"name at least one suite, e.g. suites='[i2p]' (of {list(SUITE_NAMES)}), or attacks.run")
        for i, s in enumerate(self.suites):
            check(s in SUITE_NAMES, f"suites[{i}]", f"unknown suite '{s}', expected one of {list(SUITE_NAMES)}")
        check(len(set(self.suites)) == len(self.suites), "suites", "a suite is named twice")
        if "coco" in self.suites and self.coco.lpips_base is not None:
            check(self.coco.lpips_base in labels, "coco.lpips_base",
                  f"'{self.coco.lpips_base}' is not an entry label ({', '.join(labels)})")
        check(any(e.model is not None for e in self.entries), "entries",
              "every entry's model is null (not given): give at least one model")
        if "coco" in self.suites:
            base = self.coco.lpips_base or self.entries[0].label
            check(next(e for e in self.entries if e.label == base).model is not None, "coco.lpips_base",
                  f"the LPIPS base entry '{base}' has no model (null); give it one or choose another coco.lpips_base")
        names = [t.name for t in self.tables]
        for i, table in enumerate(self.tables):
            check_table(table, f"tables[{i}]", labels)
        dup_t = sorted({x for x in names if names.count(x) > 1})
        check(not dup_t, "tables", f"table names must be unique, '{dup_t[0] if dup_t else ''}' is repeated")


def check_table(table: TableConfig, key: str, labels: list[str]) -> None:
    check(bool(TABLE_NAME.match(table.name)), f"{key}.name",
          f"'{table.name}' must be letters, digits, _ and - (it names a file)")
    for j, row in enumerate(table.rows):
        check(row in labels, f"{key}.rows[{j}]", f"'{row}' is not an entry label ({', '.join(labels)})")
    check(len(table.columns) > 0, f"{key}.columns", "list at least one column, e.g. [{suite: i2p, metric: "
          "inappropriate}]")
    for j, col in enumerate(table.columns):
        check(col.suite in SUITE_METRICS, f"{key}.columns[{j}].suite",
              f"unknown suite '{col.suite}', expected one of {list(SUITE_METRICS)}")
        check(col.metric in SUITE_METRICS[col.suite], f"{key}.columns[{j}].metric",
              f"'{col.metric}' is not a metric of {col.suite}, expected one of {list(SUITE_METRICS[col.suite])}")
        if table.categories:
            check(col.suite == "i2p", f"{key}.columns[{j}].suite",
                  f"a table split by categories takes i2p columns only, got {col.suite}")
    for j, cat in enumerate(table.categories):
        check(cat in (*I2P_CATEGORIES, OVERALL), f"{key}.categories[{j}]",
              f"unknown category '{cat}', expected one of {[*I2P_CATEGORIES, OVERALL]}")


def check_overrides(overrides) -> None:
    """An override cannot set one item of a list (OmegaConf would replace the list): say so in one line."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if "[" in key:
            raise ConfigError(f"config error: override '{item}': one item of a list cannot be set; give the whole "
                              "list (entries='[...]'), or name model paths in paths.NAME and set paths.NAME=...")
