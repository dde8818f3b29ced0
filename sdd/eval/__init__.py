"""Evaluation: prompt suites (``prompts``), detectors (``detectors``), metrics (``metrics``), and ``sdd-eval``.

``sdd-eval`` (``harness``) runs entries x suites: its config is ``schema``, the suites and scorers ``suites``, the
per-image result cache ``store``, the pure aggregation ``aggregate`` and the report ``report``.
Modules import their heavy or optional dependencies (transformers models, nudenet) only when used.
"""
