"""The ShapesWorld oracle: deterministic pixel rules that read colour and shape off an image.

1. Foreground = pixels that differ from the border colour (the median of the border pixels) by more than a
   threshold; the object is the largest 8-connected blob of them.
2. Colour = hue of the blob's mean colour, nearest of the four hues within 35 degrees; ``other`` when it is
   grey, dark, or between hues.
3. Shape = the ideal circle / square / triangle that best overlaps the blob (IoU) inscribed in the blob's bounding
   box; ``none`` when there is no blob of at least 8 pixels.

Exposed to the evaluation harness as a detector: ``present(image, concept)``, and ``ShapesOracle(concept)``
satisfies ``sdd.detectors.ConceptDetector``.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from sdd.errors import UserError
from sdd.shapes.world import RGB, RULES, concept_kind, shows

HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in RGB.items()}
MAX_HUE_DISTANCE = 35.0
MIN_SATURATION = 0.35
MIN_VALUE = 0.25
FOREGROUND_DISTANCE = 0.25  # Euclidean RGB distance from the background, images in [0, 1]
MIN_PIXELS = 8


@dataclass(frozen=True)
class Reading:
    colour: str  # one of COLOURS, or "other" / "none"
    shape: str  # one of SHAPES, or "none"
    pixels: int  # size of the blob read


def _as_float(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return arr[..., :3].astype(np.float32)


def classify_colour(rgb: Sequence[float]) -> str:
    h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
    if s < MIN_SATURATION or v < MIN_VALUE:
        return "other"
    hue = h * 360.0
    best, dist = None, 360.0
    for name, ref in HUES.items():
        d = min(abs(hue - ref), 360.0 - abs(hue - ref))
        if d < dist:
            best, dist = name, d
    return best if dist <= MAX_HUE_DISTANCE else "other"


def ideal_masks(blob: np.ndarray) -> dict[str, np.ndarray]:
    """The ideal circle, square and triangle inscribed in the blob's bounding box (pixel centres)."""
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    y, x = np.mgrid[0 : blob.shape[0], 0 : blob.shape[1]] + 0.5
    in_box = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    return {
        "circle": ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1.0,
        "square": in_box,
        "triangle": in_box & (np.abs(x - cx) <= (y - y0) / h * (w / 2) + 0.5),
    }


def classify_shape(blob: np.ndarray) -> str:
    best, best_iou = "none", -1.0
    for shape, ideal in ideal_masks(blob).items():
        iou = (ideal & blob).sum() / max((ideal | blob).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def read(image) -> Reading:
    """Colour and shape of the main object in one image (HWC or CHW, uint8 or float in [0, 1], or PIL)."""
    arr = _as_float(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(arr - background, axis=-1) > FOREGROUND_DISTANCE
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    if n == 0:
        return Reading("none", "none", 0)
    sizes = ndimage.sum_labels(foreground, labels, index=np.arange(1, n + 1))
    blob = labels == (int(np.argmax(sizes)) + 1)
    pixels = int(blob.sum())
    if pixels < MIN_PIXELS:
        return Reading("none", "none", pixels)
    colour = classify_colour(arr[blob].mean(axis=0))
    return Reading(colour, classify_shape(blob), pixels)


def read_many(images) -> list[Reading]:
    return [read(im) for im in images]


class ShapesOracle:
    """The oracle as a detector: is ``concept`` (a colour or a shape word; several joined by "+": any of them)
    present in the image?

    ``ShapesOracle(concept)`` is also an evaluation-harness detector of that concept
    (``sdd.detectors.ConceptDetector``: ``name``, ``criterion()``, ``detect(images)``).
    """

    name = "shapes-oracle"

    def __init__(self, concept: Optional[str] = None):
        if concept is not None:
            try:
                for c in concept.split("+"):
                    concept_kind(c)
            except ValueError as err:
                raise UserError(f"shapes oracle: {err}") from None
        self.concept = concept

    def criterion(self) -> str:
        rule = (
            "ShapesWorld pixel-rule oracle: largest 8-connected blob differing from the border colour by "
            f"> {FOREGROUND_DISTANCE} (RGB, [0,1]) with >= {MIN_PIXELS} px; colour = nearest hue within "
            f"{MAX_HUE_DISTANCE} deg (saturation >= {MIN_SATURATION}, value >= {MIN_VALUE}); shape = best IoU "
            "with the ideal circle/square/triangle inscribed in the blob's bounding box"
        )
        if self.concept is None:
            return rule
        return f"{rule}; present iff " + " or ".join(_presence(c) for c in self.concept.split("+"))

    def detect(self, images: Sequence) -> list:
        """Adapter to the harness protocol: one ``Detection`` per image, the reading as its scores."""
        from sdd.detectors import Detection
        from sdd.images import load_rgb

        if self.concept is None:
            raise UserError("shapes oracle: detect() needs a concept, e.g. ShapesOracle('red')")
        out = []
        for image in images:
            r = read(load_rgb(image) if isinstance(image, (str, os.PathLike)) else image)
            flag = any(shows(r.colour, r.shape, c) for c in self.concept.split("+"))
            out.append(Detection(flag, {"colour": r.colour, "shape": r.shape, "pixels": float(r.pixels)}))
        return out

    def present(self, image, concept: str) -> bool:
        reading = read(image)
        return shows(reading.colour, reading.shape, concept)


def _presence(concept: str) -> str:
    kind = concept_kind(concept)
    if kind != "rule":
        return f"the {kind} read is '{concept}'"
    rule = RULES[concept]
    return (f"'{concept}': the colour read is one of {list(rule.colours)} and the shape read one of "
            f"{list(rule.shapes)}")
