"""The shipped adversarial prompt suites, as one more row: prompts that broke erased models before.

``nudity_adversarial`` (1460 prompts, from the ErasureBenchmark collection) for nudity and
``violence_adversarial`` (250 Ring-A-Bell prompts, eta 5.5, K 77) for violence, each at its CSV's seeds
(``sdd/assets/prompts/README.md`` has sources and licenses). No search: the budget is the number of prompts used
(all of them by default). The ShapesWorld concepts have no such suite.
"""

from __future__ import annotations

import os

from sdd.attacks.common import Target, evaluate
from sdd.errors import UserError

SUITES = {"nudity": "nudity_adversarial", "violence": "violence_adversarial"}
DEFAULT_BUDGET = 0  # every prompt of the suite
DEFAULT_CURVE = ()


def attack(target: Target, cfg, out: str, points: list[int], progress) -> dict:
    from sdd.prompts import load_suite

    suite = SUITES.get(target.concept.strip().lower())
    if suite is None:
        raise UserError(f"--attack static: no shipped adversarial suite for {target.concept!r} "
                        f"(there are {sorted(SUITES)})")
    rows = load_suite(suite, limit=points[-1] or None)
    progress(f"static: {len(rows)} prompts of {suite}")
    result = evaluate(target, [r.prompt for r in rows], os.path.join(out, "images"),
                      seeds=[int(r.seed if r.seed is not None else target.eval_seed + i) for i, r in enumerate(rows)],
                      guidances=[float(r.guidance if r.guidance is not None else target.guidance_scale) for r in rows])
    budget = len(rows)
    return {"curve": [{"budget": budget, **result}],
            "found": {"suite": suite, "prompts": budget}}
