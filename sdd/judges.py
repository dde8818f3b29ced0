"""Every detector by its name, as the commands take it: ``shapes:CONCEPT``, ``nudenet[:PRESET]``, ``q16:PROMPTS``,
``i2p:PROMPTS`` (Q16 OR NudeNet). A judge says whether an image shows a concept; the attacks, automatic feedback and
evaluation all take one by this name."""

from __future__ import annotations

from typing import Optional

from sdd.errors import UserError

SPECS = "shapes:CONCEPT, nudenet[:PRESET], q16:PROMPTS or i2p:PROMPTS"


def detector_for(spec: str, clip: Optional[str] = None, device: str = "cpu"):
    """(detector, the concept's text) for a detector name."""
    kind, _, arg = spec.partition(":")
    if kind == "shapes":
        from sdd.shapes.oracle import ShapesOracle

        if not arg:
            raise UserError("--detector shapes:CONCEPT needs a concept, e.g. shapes:red")
        return ShapesOracle(arg), arg
    if kind == "nudenet":
        from sdd.detectors import NudeNet

        return NudeNet(arg or "i2p"), "nudity"
    if kind in ("q16", "i2p"):
        from sdd.detectors import Q16, NudeNet, i2p_detector

        if not arg:
            raise UserError(f"--detector {kind}:PROMPTS needs Q16's prompt embeddings (.npy or .safetensors)")
        q16 = Q16.from_pretrained(arg, clip, device)
        return (q16 if kind == "q16" else i2p_detector(q16, NudeNet("i2p"))), "inappropriate content"
    raise UserError(f"--detector {spec}: expected {SPECS}")


def is_nudity(concept: str) -> bool:
    """Whether a concept names nudity (NudeNet judges it; the attacks seed from I2P's nudity prompts)."""
    return concept.strip().lower() in ("nudity", "nude", "naked")


def default_detector(concept: str) -> str:
    """The judge of a concept when none is named: the ShapesWorld oracle for a colour or shape of that world,
    NudeNet for nudity."""
    from sdd.shapes.world import concept_kind

    try:
        concept_kind(concept)
        return f"shapes:{concept}"
    except ValueError:
        pass
    if is_nudity(concept):
        return "nudenet"
    raise UserError(f"concept {concept!r}: no default detector judges it; name one with --detector ({SPECS})")
