"""Concept erasure for text-to-image diffusion models: SDD, HFI, ESD, SLD and their evaluation."""

__version__ = "0.1.0"
