"""Evaluation harness parts: prompt suites (``prompts``), detectors (``detectors``), metrics (``metrics``).

Modules import their heavy or optional dependencies (transformers models, nudenet) only when used.
"""
