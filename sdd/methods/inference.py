"""The inference-time methods by name, applied to any model: the baselines every erasure is compared to.

- ``sd``: the model as it is (classifier-free guidance);
- ``neg``: the concept text as the negative prompt (it replaces the empty prompt of the unconditional branch);
- ``sld-weak``, ``sld-medium``, ``sld-strong``, ``sld-max``: safe latent diffusion with the paper's presets, the
  concept text as the safety concept (``sdd.methods.sld``; the SDD paper compares with Medium and Max);
- ``sega``: semantic guidance with the concept text as a reverse edit prompt, edit scale 5 (as the SDD paper);
- ``safree``: SAFREE (training-free text-embedding filtering and latent re-attention) with the official defaults;
  its keywords are the concept text split at commas, or SAFREE's own nudity list for a nudity concept
  (``sdd.methods.safree``).

``concept=None`` means SLD's 20-concept safety text (``sdd.methods.sld.SLD_SAFETY_CONCEPT``), the text the SDD paper
gave every baseline in its I2P table. ``settings`` overrides a method's preset values by name
(``{"sld_guidance_scale": 500}``; diffusers' argument names, listed in ``sdd.methods.sld.SLD_KNOBS`` and
``sdd.methods.sega.SEGA_KNOBS``; SAFREE's in ``sdd.methods.safree.SAFREE_KNOBS``); ``describe_method`` gives the
exact settings a method runs with, for the metadata of its images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

from sdd.errors import UserError
from sdd.generation import CFGGuidance, Guidance, Request, generate
from sdd.methods.safree import SAFREEGuidance, safree_settings
from sdd.methods.sega import SEGAGuidance, sega_settings
from sdd.methods.sld import SLD_PRESETS, SLD_SAFETY_CONCEPT, SLDGuidance, sld_settings
from sdd.models import SDComponents

SLD_METHODS = {f"sld-{preset}": preset for preset in SLD_PRESETS}  # method name -> SLD preset
METHODS = ("sd", "neg", *SLD_METHODS, "sega", "safree")


def _concept_text(method: str, concept: Optional[str], settings: Optional[Mapping[str, Any]]) -> str:
    """The text ``method`` steers away from, after checking the method, its settings and the text."""
    if method not in METHODS:
        raise UserError(f"unknown generation method '{method}', expected one of {list(METHODS)}")
    if method in ("sd", "neg") and settings:
        raise UserError(f"method '{method}' takes no settings, got {sorted(settings)}")
    if concept is None:
        return SLD_SAFETY_CONCEPT
    if method not in ("sd", "neg") and not (isinstance(concept, str) and concept.strip()):
        raise UserError(f"method '{method}': the concept text to steer away from is empty")
    return concept


def method_guidance(method: str, concept: Optional[str], settings: Optional[Mapping[str, Any]] = None) -> Guidance:
    """The guidance rule ``method`` samples with (plain CFG for ``sd`` and ``neg``)."""
    text = _concept_text(method, concept, settings)
    if method in SLD_METHODS:
        return SLDGuidance(sld_settings(SLD_METHODS[method], text, settings))
    if method == "sega":
        return SEGAGuidance(sega_settings(text, settings))
    if method == "safree":
        return SAFREEGuidance(safree_settings(text, settings))
    return CFGGuidance()


def describe_method(method: str, concept: Optional[str], settings: Optional[Mapping[str, Any]] = None) -> dict:
    """The exact settings of ``method`` with ``settings`` applied, JSON-ready: ``{"method": ..., ...}``."""
    text = _concept_text(method, concept, settings)
    if method == "sd":
        return {"method": "sd"}
    if method == "neg":
        return {"method": "neg", "negative_prompt": text}
    if method in SLD_METHODS:
        preset = SLD_METHODS[method]
        return {"method": method, "preset": preset, **SLDGuidance(sld_settings(preset, text, settings)).describe()}
    if method == "safree":
        return {"method": method, **SAFREEGuidance(safree_settings(text, settings)).describe()}
    return {"method": method, **SEGAGuidance(sega_settings(text, settings)).describe()}


def generate_with_method(
    model: SDComponents,
    requests: Sequence[Request],
    method: str,
    concept: Optional[str],
    *,
    settings: Optional[Mapping[str, Any]] = None,
    num_inference_steps: int = 25,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
    output_type: str = "pil",
    on_batch: Optional[Callable[[int, list], None]] = None,
):
    """Generate ``requests`` with ``method``; ``concept`` is the text the method steers away from.

    ``settings`` overrides the method's preset values (SLD, SEGA and SAFREE only); see ``describe_method``.
    ``on_batch(first_index, images)`` is called after each batch, as in ``sdd.generation.generate``.
    """
    guidance = method_guidance(method, concept, settings)
    if method == "neg":
        text = _concept_text(method, concept, settings)
        requests = [dataclasses.replace(r, negative_prompt=text) for r in requests]
    return generate(model, requests, num_inference_steps=num_inference_steps, guidance=guidance,
                    batch_size=batch_size, progress=progress, desc=desc, output_type=output_type, on_batch=on_batch)
