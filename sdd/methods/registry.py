"""Every method the training loop runs, by the name a config's ``method`` field gives it.

    name -> (config schema, method class, stages)

``stages(cfg)`` lists the (config, method class) pairs a run trains in order (one for most methods; the ShapesWorld
base model trains its VAE first). ``sdd.api.train`` runs them, ``sdd.api.export`` rebuilds the last one from a
checkpoint. A new method adds its line here and nothing anywhere else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from sdd.errors import UserError
from sdd.methods import esd, hfi, reward, sdd, shapes_base


class Entry(NamedTuple):
    schema: type
    method: type
    stages: Callable[[object], list[tuple[object, type]]]


def _one(method: type) -> Callable[[object], list[tuple[object, type]]]:
    return lambda cfg: [(cfg, method)]


METHODS: dict[str, Entry] = {
    "sdd": Entry(sdd.SDDConfig, sdd.SDDMethod, _one(sdd.SDDMethod)),
    "esd": Entry(esd.ESDConfig, esd.ESDMethod, _one(esd.ESDMethod)),
    "hfi": Entry(hfi.HFIConfig, hfi.HFIMethod, _one(hfi.HFIMethod)),
    "hfi-reward": Entry(reward.RewardConfig, reward.RewardMethod, _one(reward.RewardMethod)),
    "shapes-base": Entry(shapes_base.ShapesBaseConfig, shapes_base.ShapesDiffusionMethod, shapes_base.stages),
}


def entry(name: str | None, where: str = "method") -> Entry:
    if name not in METHODS:
        raise UserError(f"{where}: unknown method {name!r}, expected one of {sorted(METHODS)}")
    return METHODS[name]
