"""The command-line tools: each parses its arguments and calls ``sdd.api`` (``sdd-export``, ``sdd-generate``,
``sdd-eval``, ``sdd-shapes``, ``sdd-bench``; ``train`` serves the entry scripts of ``train/``)."""
