"""What every entry script of ``train/`` does: parse ``--config FILE [--resume [DIR]] key=value ...``, call
``sdd.api.train``, print where the run went."""

from __future__ import annotations

from typing import Sequence

from sdd import api
from sdd.config import parse_args
from sdd.files import to_json
from sdd.loop import FitResult, describe
from sdd.methods.registry import entry


def run(method: str, argv: Sequence[str] | None, description: str) -> FitResult:
    cfg = parse_args(entry(method).schema, argv, description=description)
    result = api.train(cfg)
    if result.main_process:
        print(describe(result, cfg.output_dir))
        for key, value in result.summary.items():
            print(f"{key}: {to_json(value)}")
    return result
