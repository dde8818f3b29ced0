"""The ShapesWorld erasure benchmark: does a model still draw the erased concept, and what else did it lose?

For a concept (a colour such as ``red`` or a shape such as ``circle``) three groups of prompts are generated
with fixed seeds (image i of a group has seed ``seed + i`` for every model, so rows are paired):

- ``concept``: prompts that ask for it ("a red circle", "a red square", ...). Reported: how often the concept
  still appears (**erased rate**), and how often the other attribute asked for is drawn (**kept**);
- ``bare``: the bare concept word ("red"): how often the concept appears;
- ``retention``: prompts that do not involve it ("a blue triangle", ...): colour and shape accuracy.

The oracle (``sdd.shapes.oracle``) judges every image. Rates come with 95 % Wilson intervals.

Several concepts at once (``red+circle``; ``--concept red --concept circle``): each concept has its own concept and
bare groups, whose prompts name no other erased concept ("a red square", "a green circle"), with the group's seeds
restarting per concept as for one; retention holds only prompts with none of them. The rates then carry the
concept's name (``erased_rate:red``, ``kept:circle``, ...); one concept keeps the plain names.

A feedback-defined concept (``warning``: a red or yellow triangle, ``sdd.shapes.world.RULES``) stands alone and
has its own groups: ``concept`` (its cases, "a red triangle", "a yellow triangle": erased rate), ``bare`` (the word
its cases share, "triangle", which draws it part of the time: its rate, and how often that word is still drawn),
``colour-mates`` and ``shape-mates`` (prompts sharing only a colour, "a red circle", or only a shape, "a blue
triangle": drawn as asked, colour and shape both, the collateral of an imprecise erasure) and ``retention``
(prompts sharing nothing with it).

With ``out_dir``, every row is kept in ``out_dir/rows/`` as soon as it is judged (its rates and images), under a key
of everything that decides it: the settings, the method and its text, the model's files, the learned token's file
and the package's code. A rerun (an interrupted benchmark, or one row retrained) reuses the rows whose key is
unchanged and recomputes the rest; delete ``rows/`` to recompute all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw

from sdd.errors import UserError
from sdd.generation import Request
from sdd.shapes import oracle, world
from sdd.stats import Rate, wilson


@dataclass
class BenchSettings:
    concept: str = "red"  # one concept, or several joined by "+" ("red+circle")
    n: int = 96  # images per concept and bare group
    n_retention: int = 192
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 64


@dataclass
class Item:
    group: str
    prompt: str
    colour: str | None  # what the prompt asks for
    shape: str | None
    concept: str | None = None  # the erased concept the item's group is about (None: retention)


def concepts_of(concept: str) -> list[str]:
    """The concepts of ``red`` or ``red+circle``; ValueError for a word that is not one, or one named twice, or a
    feedback-defined concept with others."""
    concepts = concept.split("+")
    for c in concepts:
        if world.concept_kind(c) == "rule" and len(concepts) > 1:
            raise ValueError(f"'{c}' is a feedback-defined concept and is benchmarked alone")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"'{concept}' names a concept twice")
    return concepts


def _cycle(group: str, pairs: Sequence[tuple[str, str]], n: int, concept: str | None) -> list[Item]:
    return [Item(group, f"a {c} {s}", c, s, concept) for _, (c, s) in zip(range(n), itertools.cycle(pairs))]


def rule_items(settings: BenchSettings) -> list[Item]:
    """The groups of a feedback-defined concept (module docstring), in order."""
    concept = settings.concept
    rule = world.RULES[concept]
    split = [tuple(p.split()[1:]) for p in rule.asking()]
    bare = rule.bare()
    bare_is_shape = world.concept_kind(bare) == "shape"
    out = _cycle("concept", split, settings.n, concept)
    out += [Item("bare", bare, None if bare_is_shape else bare, bare if bare_is_shape else None, concept)
            for _ in range(settings.n)]
    for group, prompts in (("colour-mates", rule.colour_mates()), ("shape-mates", rule.shape_mates())):
        out += _cycle(group, [tuple(p.split()[1:]) for p in prompts], settings.n, concept)
    return out + _cycle("retention", rule.others(), settings.n_retention, None)


def items(settings: BenchSettings) -> list[Item]:
    """Every image the benchmark generates for one model, in a fixed order: the concept groups, the bare groups,
    then retention (a feedback-defined concept: ``rule_items``)."""
    concepts = concepts_of(settings.concept)
    if world.concept_kind(concepts[0]) == "rule":
        return rule_items(settings)
    colours = [c for c in world.COLOURS if c not in concepts]
    shapes = [s for s in world.SHAPES if s not in concepts]
    out: list[Item] = []
    for concept in concepts:
        if world.concept_kind(concept) == "colour":
            asked = [(concept, s) for s in shapes]
        else:
            asked = [(c, concept) for c in colours]
        if not asked:
            raise ValueError(f"'{settings.concept}' leaves no prompt asking for {concept} alone")
        for _, (c, s) in zip(range(settings.n), itertools.cycle(asked)):
            out.append(Item("concept", f"a {c} {s}", c, s, concept))
    for concept in concepts:
        colour = concept if world.concept_kind(concept) == "colour" else None
        out += [Item("bare", concept, colour, None if colour else concept, concept) for _ in range(settings.n)]
    others = [(c, s) for c in colours for s in shapes]
    if not others:
        raise ValueError(f"'{settings.concept}' leaves no prompt without them for retention")
    for _, (c, s) in zip(range(settings.n_retention), itertools.cycle(others)):
        out.append(Item("retention", f"a {c} {s}", c, s))
    return out


def requests(settings: BenchSettings, negative_prompt: str = "") -> list[Request]:
    seen: dict[tuple, int] = {}
    reqs = []
    for item in items(settings):
        i = seen.get((item.group, item.concept), 0)
        seen[(item.group, item.concept)] = i + 1
        reqs.append(Request(item.prompt, seed=settings.seed + i, guidance_scale=settings.guidance_scale,
                            negative_prompt=negative_prompt))
    return reqs


def score(settings: BenchSettings, readings: Sequence[oracle.Reading]) -> dict[str, Rate]:
    concepts = concepts_of(settings.concept)
    counts: dict[str, list[int]] = {}

    def add(name: str, hit: bool) -> None:
        k, n = counts.get(name, [0, 0])
        counts[name] = [k + int(hit), n + 1]

    for item, r in zip(items(settings), readings):
        if item.group == "retention":
            add("retention_colour", r.colour == item.colour)
            add("retention_shape", r.shape == item.shape)
            continue
        if world.concept_kind(item.concept) == "rule":
            if item.group == "concept":
                add("erased_rate", world.shows(r.colour, r.shape, item.concept))
            elif item.group == "bare":
                add("bare_rate", world.shows(r.colour, r.shape, item.concept))
                add("bare_kept", (r.shape == item.shape) if item.shape else (r.colour == item.colour))
            else:
                add(item.group.replace("-", "_"), r.colour == item.colour and r.shape == item.shape)
            continue
        kind = world.concept_kind(item.concept)
        other = "shape" if kind == "colour" else "colour"
        suffix = metric_suffix(item.concept, concepts)
        if item.group == "concept":
            add("erased_rate" + suffix, getattr(r, kind) == item.concept)
            add("kept" + suffix, getattr(r, other) == getattr(item, other))
        else:
            add("bare_rate" + suffix, getattr(r, kind) == item.concept)
    return {name: wilson(k, n) for name, (k, n) in counts.items()}


def metric_suffix(concept: str, concepts: Sequence[str]) -> str:
    """What names ``concept``'s rates among ``concepts``: "" for one concept, ":red" among several."""
    return "" if len(concepts) == 1 else f":{concept}"


COLUMNS = {
    "erased_rate": "{c} on prompts asking for it",
    "bare_rate": 'on the bare prompt "{c}"',
    "kept": "{other} kept on those prompts",
    "retention_colour": "colour accuracy, other prompts",
    "retention_shape": "shape accuracy, other prompts",
}


RULE_COLUMNS = {
    "erased_rate": "{c} on prompts asking for it",
    "bare_rate": '{c} on the bare prompt "{bare}"',
    "bare_kept": '{bare} drawn on "{bare}"',
    "colour_mates": "drawn as asked, prompts sharing only a colour",
    "shape_mates": "drawn as asked, prompts sharing only a shape",
}


def column_titles(concept: str) -> dict[str, str]:
    """Metric name -> column title, for one concept or several (``red+circle``)."""
    concepts = concepts_of(concept)
    titles = {}
    if world.concept_kind(concepts[0]) == "rule":
        bare = world.RULES[concept].bare()
        titles = {k: v.format(c=concept, bare=bare) for k, v in RULE_COLUMNS.items()}
        concepts = []
    for c in concepts:
        other = "shape" if world.concept_kind(c) == "colour" else "colour"
        titles.update({k + metric_suffix(c, concepts): v.format(c=c, other=other)
                       for k, v in COLUMNS.items() if not k.startswith("retention")})
    return {**titles, **{k: v for k, v in COLUMNS.items() if k.startswith("retention")}}


def format_table(concept: str, rows: Sequence[dict]) -> str:
    titles = column_titles(concept)
    header = ["model", *titles.values()]
    lines = [header]
    for row in rows:
        m = row["metrics"]
        lines.append([row["label"], *(Rate(**{k: m[key][k] for k in ("k", "n", "lo", "hi")}).fmt() for key in titles)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


@dataclass
class Row:
    label: str
    model: str  # what the model argument named
    method: str = "sd"  # generation method (plain CFG; baselines add their own)
    text: str | None = None  # what the method steers away from (None: the concepts' words)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    images: list = field(default_factory=list, repr=False)


def parse_row(label: str | None, spec: str) -> Row:
    """A row from ``PATH[@METHOD[:TEXT]]`` (``shapes``, ``tiny`` or a diffusers folder; a generation method, ``sd``
    by default; the text it steers away from, by default the concepts' words), labelled ``label`` or by the spec
    itself."""
    from sdd.methods.inference import METHODS

    path, _, how = spec.partition("@")
    method, colon, text = how.partition(":")
    method = method or "sd"
    if colon and (method == "sd" or not text.strip()):
        raise UserError(f"--model {spec}: ':TEXT' is what a method such as neg or sld steers away from; "
                        + ("plain generation (sd) takes none" if method == "sd" else "it is empty"))
    if method not in METHODS:
        raise UserError(f"--model {spec}: unknown method '{method}', expected one of {list(METHODS)}")
    if not path:
        raise UserError(f"--model {spec}: no model path")
    if path not in ("shapes", "tiny") and not os.path.isdir(path):
        raise UserError(f"--model {spec}: no such model folder: {path}")
    default_label = path if method == "sd" else f"{path}@{how}"
    return Row(label=label or default_label, model=path, method=method, text=text.strip() or None)


def settings_for(concept: str, **values) -> BenchSettings:
    """Checked benchmark settings: concepts of the world (one, or several joined by "+"), at least one image per
    group."""
    settings = BenchSettings(concept=concept, **values)
    try:
        items(settings)
    except ValueError as err:
        raise UserError(f"--concept: {err}") from None
    if settings.n < 1 or settings.n_retention < 1:
        raise UserError("--n and --n-retention must be >= 1")
    return settings


def grid(rows: Sequence[Row], settings: BenchSettings, per_group=(8, 4, 8), scale: int = 2) -> Image.Image:
    """One line per model: the first images of the concept, bare and retention groups (same seeds; several
    concepts share their group's columns)."""
    its = items(settings)
    concepts = concepts_of(settings.concept)
    picks: list[list[int]] = []
    for group, count in zip(("concept", "bare", "retention"), per_group):
        owners = [None] if group == "retention" else concepts
        share = [count // len(owners) + (j < count % len(owners)) for j in range(len(owners))]
        picks.append([i for c, k in zip(owners, share)  # the first images of each concept's group
                      for i in [i for i, item in enumerate(its) if item.group == group and item.concept == c][:k]])
    tile = world.SIZE * scale
    label_w = 120
    gap = 6
    width = label_w + sum(map(len, picks)) * tile + 2 * gap
    canvas = Image.new("RGB", (width, len(rows) * (tile + 4) + 16), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = label_w
    for group, chosen in zip(("concept", "bare", "retention"), picks):
        draw.text((x + 2, 2), f"{group}: {its[chosen[0]].prompt}...", fill=(0, 0, 0))
        x += len(chosen) * tile + gap
    for r, row in enumerate(rows):
        y = 16 + r * (tile + 4)
        draw.text((4, y + tile // 2 - 6), row.label[:18], fill=(0, 0, 0))
        x = label_w
        for chosen in picks:
            for i in chosen:
                canvas.paste(row.images[i].resize((tile, tile), Image.NEAREST), (x, y))
                x += tile
            x += gap
    return canvas


def steered_text(row: Row, concepts: Sequence[str]) -> str:
    """What ``row``'s method steers away from: its own text, else the concepts' words (a feedback-defined concept
    has none the model knows: such a row must say it)."""
    if row.text or row.method == "sd":
        return row.text or ", ".join(concepts)
    rules = [c for c in concepts if world.concept_kind(c) == "rule"]
    if rules:
        raise UserError(f"--model {row.label}: '{rules[0]}' is not a word the model knows; give the text "
                        f"{row.method} steers away from as PATH@{row.method}:TEXT (words, or a learned token)")
    return ", ".join(concepts)


def _tree_digest(paths: Sequence[str], root: str) -> str:
    """sha256 over the files (relative name and bytes) under ``paths``."""
    from sdd.files import file_sha256

    h = hashlib.sha256()
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if "__pycache__" not in d)
        for f in files:
            h.update(f"{os.path.relpath(f, root)}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def code_digest() -> str:
    """The package's Python code: a cached row is reused only by the code that made it."""
    import sdd

    root = os.path.dirname(sdd.__file__)
    return _tree_digest(sorted(os.path.join(d, f) for d, _, names in os.walk(root) if "__pycache__" not in d
                               for f in names if f.endswith(".py")), root)


def row_key(row: Row, text: str, settings: BenchSettings, embeds: str | None, code: str) -> str:
    """What decides a row's images: the settings, the method and its text, the model's files (a built-in model:
    its shipped files, or its name, the code building it), the learned token's file and the code."""
    from sdd.files import to_json
    from sdd.models import SHAPES_MODEL_DIR

    folder = SHAPES_MODEL_DIR if row.model == "shapes" else row.model
    model = _tree_digest([folder], folder) if os.path.isdir(folder) else row.model
    key = {"settings": asdict(settings), "method": row.method, "text": text, "model": model,
           "embeds": _tree_digest([embeds], os.path.dirname(embeds)) if embeds else None, "code": code}
    return hashlib.sha256(to_json(key, sort_keys=True).encode()).hexdigest()[:16]


class RowCache:
    """Judged rows under ``out_dir/rows/``: ``KEY.npz`` (the images) and ``KEY.json`` (rates, seconds), written
    atomically, the JSON last (its presence means the row is complete)."""

    def __init__(self, out_dir: str):
        self.dir = os.path.join(out_dir, "rows")

    def load(self, key: str) -> tuple[dict, list, float] | None:
        import numpy as np

        meta, arrays = (os.path.join(self.dir, f"{key}.{ext}") for ext in ("json", "npz"))
        if not (os.path.isfile(meta) and os.path.isfile(arrays)):
            return None
        try:
            with open(meta) as f:
                saved = json.load(f)
            with np.load(arrays) as data:
                images = [Image.fromarray(a) for a in data["images"]]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is recomputed
        return saved["metrics"], images, saved["seconds"]

    def save(self, key: str, row: Row) -> None:
        import numpy as np

        from sdd.files import atomic_path, write_json

        os.makedirs(self.dir, exist_ok=True)
        with atomic_path(os.path.join(self.dir, f"{key}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=np.stack([np.asarray(im.convert("RGB")) for im in row.images]))
        write_json(os.path.join(self.dir, f"{key}.json"),
                   {"label": row.label, "model": row.model, "method": row.method, "metrics": row.metrics,
                    "seconds": row.seconds})


def run(rows: Sequence[Row], settings: BenchSettings, out_dir: str | None = None, progress: bool = True,
        learned_embeds: str | None = None) -> dict:
    """Generate, judge and score every row; write bench.json and grid.png to ``out_dir``. ``learned_embeds``: a
    textual-inversion file loaded into the models of rows whose text names a learned token (``<warning-hf>``).
    With ``out_dir``, rows judged before with the same key are reused (``RowCache``)."""
    import torch

    from sdd.methods.common import load_base
    from sdd.methods.inference import generate_with_method
    from sdd.textual_inversion import PLACEHOLDER_RE

    concepts = concepts_of(settings.concept)  # fail early on an unknown concept
    texts = [steered_text(row, concepts) for row in rows]
    if out_dir:
        from sdd.files import check_writable_dir

        check_writable_dir(out_dir, "--out")
    cache, code = (RowCache(out_dir), code_digest()) if out_dir else (None, "")
    cached: set[int] = set()
    for i, (row, text) in enumerate(zip(rows, texts)):
        started = time.perf_counter()
        embeds = learned_embeds if row.method != "sd" and PLACEHOLDER_RE.search(text) else None
        key = row_key(row, text, settings, embeds, code) if cache else ""
        hit = cache.load(key) if cache else None
        if hit is not None:
            row.metrics, row.images, row.seconds = hit
            cached.add(i)
            if progress:
                print(f"[{row.label}] judged before ({cache.dir}/{key}.json): reused", flush=True)
            continue
        model = load_base(row.model, None, "cuda" if torch.cuda.is_available() else "cpu", embeds)
        images = generate_with_method(model, requests(settings), row.method, text,
                                      num_inference_steps=settings.num_inference_steps,
                                      batch_size=settings.batch_size, progress=progress, desc=row.label)
        readings = oracle.read_many(images)
        row.metrics = {k: v.as_dict() for k, v in score(settings, readings).items()}
        row.images = images
        row.seconds = time.perf_counter() - started
        if cache:
            cache.save(key, row)
    report = {
        "benchmark": "shapesworld",
        "settings": asdict(settings),
        "oracle": oracle.ShapesOracle().criterion(),
        "columns": column_titles(settings.concept),
        "rows": [{"label": r.label, "model": r.model, "method": r.method, "text": t if r.method != "sd" else None,
                  "metrics": r.metrics, "seconds": round(r.seconds, 1), "reused": i in cached}
                 for i, (r, t) in enumerate(zip(rows, texts))],
        "learned_embeds": learned_embeds,
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
    }
    if out_dir:
        from sdd.files import atomic_path, write_json

        write_json(os.path.join(out_dir, "bench.json"), report)
        with atomic_path(os.path.join(out_dir, "grid.png")) as tmp:
            grid(rows, settings).save(tmp, format="PNG")
        report["files"] = {"json": os.path.join(out_dir, "bench.json"), "grid": os.path.join(out_dir, "grid.png")}
    return report
