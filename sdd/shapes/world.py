"""ShapesWorld: a small, real text-to-image world in which erasure is measured end to end on a CPU.

An image is one filled shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a black
background, random size and position, 32x32 RGB. Its caption comes from templates: colour + shape (70 %),
colour only (15 %: so that the bare word "red" is a prompt the model knows, which SDD needs), shape only (15 %).
Everything is generated on the fly from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
RGB = {  # [0, 1]; each image jitters these a little
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.78, 0.16),
    "blue": (0.14, 0.24, 0.90),
    "yellow": (0.92, 0.86, 0.14),
}
JITTER = 0.06

BOTH_TEMPLATES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape} on black",
    "a photo of a {colour} {shape} on black",
    "an image of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
)
COLOUR_TEMPLATES = ("{colour}", "a {colour} shape", "something {colour}", "a photo of something {colour}")
SHAPE_TEMPLATES = ("{shape}", "a {shape}", "a photo of a {shape}", "a {shape} on black")


@dataclass(frozen=True)
class Rule:
    """A concept that no word of the world names, given by a rule on what the oracle reads: present iff the colour
    read is one of ``colours`` and the shape read one of ``shapes`` (the stand-in for annotators who recognise it on
    sight). ``words`` are the nearest texts a user would try instead (name -> concepts of an SDD config)."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    words: dict

    def asking(self) -> list[str]:
        """Prompts that ask for the concept: every colour x shape of the rule."""
        return [f"a {c} {s}" for c in self.colours for s in self.shapes]

    def bare(self) -> str:
        """The one word the rule's cases share (a shape when they share it, else a colour): a prompt that draws the
        concept part of the time."""
        return self.shapes[0] if len(self.shapes) == 1 else self.colours[0]

    def colour_mates(self) -> list[str]:
        """Prompts that share only a colour with the concept."""
        return [f"a {c} {s}" for c in self.colours for s in SHAPES if s not in self.shapes]

    def shape_mates(self) -> list[str]:
        """Prompts that share only a shape with it."""
        return [f"a {c} {s}" for c in COLOURS if c not in self.colours for s in self.shapes]

    def others(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs that share nothing with it."""
        return [(c, s) for c in COLOURS if c not in self.colours for s in SHAPES if s not in self.shapes]


# Feedback-defined concepts (hfi-loop, sdd-shapes bench): "warning shapes" are triangles that are red or yellow.
# Their nearest texts: the two cases as words, the shape alone, the colours alone.
RULES = {
    "warning": Rule(colours=("red", "yellow"), shapes=("triangle",),
                    words={"cases": ["red triangle", "yellow triangle"], "shape": ["triangle"],
                           "colours": ["red", "yellow"]}),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half extent, pixels
    rgb: tuple[float, float, float]


def sample_scene(rng: np.random.Generator, shape: Optional[str] = None, colour: Optional[str] = None) -> Scene:
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    r = float(rng.uniform(5.0, 11.0))
    margin = r + 1.0
    cx, cy = (float(v) for v in rng.uniform(margin, SIZE - margin, size=2))
    rgb = tuple(float(np.clip(c + rng.uniform(-JITTER, JITTER), 0.0, 1.0)) for c in RGB[colour])
    return Scene(shape, colour, cx, cy, r, rgb)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the shape (anti-aliased by supersampling)."""
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":  # isosceles, apex up, as wide as it is tall
        top, bottom = cy - r, cy + r
        half_width = (y - top) / (2 * r) * r
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float32 image in [0, 1]."""
    cover = shape_mask(scene.shape, scene.cx, scene.cy, scene.r, size)
    return (cover[..., None] * np.asarray(scene.rgb, dtype=np.float32)[None, None]).astype(np.float32)


def caption(rng: np.random.Generator, scene: Scene, p_both: float = 0.70, p_colour: float = 0.15) -> str:
    u = rng.random()
    if u < p_both:
        template = BOTH_TEMPLATES[rng.integers(len(BOTH_TEMPLATES))]
    elif u < p_both + p_colour:
        template = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
    else:
        template = SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]
    return template.format(colour=scene.colour, shape=scene.shape)


def sample_batch(rng: np.random.Generator, n: int, p_empty: float = 0.0) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes: images (n, 3, H, W) in [-1, 1], captions ('' with probability p_empty), scenes."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2) * 2.0 - 1.0
    captions = [("" if rng.random() < p_empty else caption(rng, s)) for s in scenes]
    return images.astype(np.float32), captions, scenes


def iter_examples(n: int, seed: int = 0) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield {
            "image": (render(scene) * 255).round().astype(np.uint8),
            "prompt": caption(rng, scene),
            "shape": scene.shape,
            "colour": scene.colour,
        }


def as_dataset(n: int, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` examples (image, prompt, shape, colour), e.g. for other trainers."""
    import datasets
    from PIL import Image

    def gen():
        for ex in iter_examples(n, seed):
            yield {**ex, "image": Image.fromarray(ex["image"])}

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": datasets.Value("string"),
            "shape": datasets.ClassLabel(names=list(SHAPES)),
            "colour": datasets.ClassLabel(names=list(COLOURS)),
        }
    )
    return datasets.Dataset.from_generator(gen, features=features)


def concept_kind(concept: str) -> str:
    """'colour' or 'shape' for a ShapesWorld concept word, 'rule' for a feedback-defined concept (``RULES``)."""
    if concept in COLOURS:
        return "colour"
    if concept in SHAPES:
        return "shape"
    if concept in RULES:
        return "rule"
    raise ValueError(f"'{concept}' is not a ShapesWorld concept; expected one of {COLOURS + SHAPES + tuple(RULES)}")


def word_kind(concept: str, what: str = "this") -> str:
    """'colour' or 'shape' for a concept word; ValueError naming ``what`` for a feedback-defined concept."""
    kind = concept_kind(concept)
    if kind == "rule":
        raise ValueError(f"{what} takes a colour or a shape word; '{concept}' is a feedback-defined concept "
                         f"(a rule on colour and shape), which it does not support")
    return kind


def shows(colour: str, shape: str, concept: str) -> bool:
    """Whether an image read as (colour, shape) shows ``concept``: the colour or shape word, or the rule."""
    kind = concept_kind(concept)
    if kind == "rule":
        rule = RULES[concept]
        return colour in rule.colours and shape in rule.shapes
    return (colour if kind == "colour" else shape) == concept
