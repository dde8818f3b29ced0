"""A thin layer over accelerate's trackers: W&B (default), TensorBoard, or none.

The only module that names ``wandb.Image``. With W&B chosen but no API key and no ``WANDB_MODE``, runs log
offline into the output folder (``wandb sync`` uploads them later) instead of failing.
"""

from __future__ import annotations

import netrc
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from sdd.config import TrackingConfig
from sdd.errors import UserError


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def log_with(cfg: TrackingConfig) -> str | None:
    """The ``log_with`` argument for ``Accelerator``, after checking the tracker can run."""
    if cfg.tracker == "none":
        return None
    if cfg.tracker == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("tracking.tracker=wandb but wandb is not installed (pip install wandb)") from None
        if not os.environ.get("WANDB_MODE") and not _wandb_has_key():
            os.environ["WANDB_MODE"] = "offline"
    if cfg.tracker == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("tracking.tracker=tensorboard but tensorboard is not installed") from None
    return cfg.tracker


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)  # lists and None: TensorBoard's hparams take scalars only
    return out


class Tracker:
    def __init__(self, accelerator, cfg: TrackingConfig, config: dict, output_dir: str):
        self.accelerator = accelerator
        self.cfg = cfg
        if cfg.tracker == "none":
            return
        init_kwargs = {}
        if cfg.tracker == "wandb":
            os.makedirs(output_dir, exist_ok=True)
            init_kwargs["wandb"] = {"dir": os.path.abspath(output_dir), "name": cfg.run_name}
        values = config if cfg.tracker == "wandb" else _flat(config)
        accelerator.init_trackers(cfg.project, config=values, init_kwargs=init_kwargs)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.cfg.tracker != "none":
            self.accelerator.log(values, step=step)

    def log_images(self, key: str, images: Sequence[Image.Image], captions: Sequence[str], step: int) -> None:
        if self.cfg.tracker == "none" or not self.accelerator.is_main_process:
            return
        tracker = self.accelerator.get_tracker(self.cfg.tracker, unwrap=True)
        if self.cfg.tracker == "wandb":
            import wandb

            tracker.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
        else:
            for i, (image, caption) in enumerate(zip(images, captions)):
                tracker.add_image(f"{key}/{i}", np.asarray(image), step, dataformats="HWC")
                tracker.add_text(f"{key}/{i}/prompt", caption, step)

    def finish(self) -> None:
        """Close this run's trackers (the process group stays up: the script may train another stage)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
