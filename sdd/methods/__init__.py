"""Fine-tuning methods. Each module: the pure math, its config dataclass, and a class the training loop runs."""

from __future__ import annotations


def registry() -> dict:
    """Method name (the config's ``method`` field) -> (config schema, method class)."""
    from sdd.methods.esd import ESDConfig, ESDMethod
    from sdd.methods.sdd import SDDConfig, SDDMethod

    return {"sdd": (SDDConfig, SDDMethod), "esd": (ESDConfig, ESDMethod)}
