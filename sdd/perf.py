"""Speed and memory switches shared by the fine-tuning methods (measured by ``sdd-bench``; see PERFORMANCE.md).

Exact switches leave a step's loss and gradients unchanged up to float round-off (tested against the default
step): ``cache_text_embeddings``, ``ema``, ``student_passes``, ``attention``, ``gradient_checkpointing``,
``channels_last``, ``share_frozen``, ``frozen_passes``. Precision switches (``teacher_precision``,
``train.mixed_precision``) change results within bf16/fp16 tolerance. ``compile`` is exact too (tested) and costs
start-up time (a minute or two).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class PerfConfig:
    # encode the empty prompt and the concepts once; false re-encodes them every step, as the original code
    cache_text_embeddings: bool = True
    # EMA with torch._foreach over the trained parameters only; 'loop': a Python loop over every parameter
    ema: Literal["foreach", "loop"] = "foreach"
    # the student's no-grad (empty prompt) and grad (concept) passes: two calls, or one batched call
    student_passes: Literal["separate", "batched"] = "separate"
    # ESD: the frozen model's two predictions (empty prompt, concept) as one batched call or two
    frozen_passes: Literal["batched", "separate"] = "batched"
    # autocast dtype of the no-grad sampling passes ('same' = the run's precision)
    teacher_precision: Literal["same", "bf16", "fp16"] = "same"
    # attention kernel: torch's scaled_dot_product_attention, or diffusers' classic (eager) processor
    attention: Literal["sdpa", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the UNets: exact; 1-2 min to start, then faster steps (CPU and GPU)
    # the teacher / frozen copy reuses the student's frozen tensors instead of holding a second copy
    share_frozen: bool = True


def apply_to_unet(unet: nn.Module, perf: PerfConfig, training: bool) -> nn.Module:
    """Attention kernel, memory format, checkpointing and compilation of one UNet (in place). An SD3 transformer
    keeps its joint-attention processor (torch's sdpa); there is no classic one for it."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if isinstance(unet, UNet2DConditionModel):
        unet.set_attn_processor(AttnProcessor2_0() if perf.attention == "sdpa" else AttnProcessor())
    elif perf.attention != "sdpa":
        from sdd.errors import UserError

        raise UserError(f"perf.attention={perf.attention}: the classic attention processor is a UNet's; "
                        f"{type(unet).__name__} runs its own (sdpa)")
    if perf.channels_last:
        unet.to(memory_format=torch.channels_last)
    if training and perf.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if perf.compile:
        unet.compile()  # in place: parameter names (and so checkpoints) stay the same
    return unet


def frozen_copy(module: nn.Module, share_frozen: bool) -> nn.Module:
    """A no-grad copy of ``module``. With ``share_frozen``, parameters that do not require grad are the same
    tensors in both (they never change, so the copy costs only the trainable parameters' memory)."""
    memo: dict = {}
    if share_frozen:
        memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    twin = copy.deepcopy(module, memo)
    for p in twin.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
    return twin.eval()


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"same": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def sampling_autocast(device: torch.device, precision: str):
    """Autocast for the no-grad sampling passes, or a no-op for 'same'."""
    import contextlib

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def ema_loop_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """The original code's EMA: a Python loop over every parameter, frozen ones included.

    A tensor the two modules share (``perf.share_frozen``) is skipped: updating it in place would scale the
    student's own frozen weight by m(2 - m) each step. ``lerp`` leaves a frozen copy that equals the student's
    bit for bit (x + w(x - x) = x; the original's m·x + (1 - m)·x is off by round-off).
    """
    for param, ema_param in zip(student.parameters(), teacher.parameters()):
        if ema_param is param:
            continue
        ema_param.lerp_(param, 1.0 - decay)


def make_optimizer(params, train) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (a GPU and bitsandbytes needed) for ``train.optimizer=adamw8bit``."""
    from sdd.errors import UserError

    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                  weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if not torch.cuda.is_available():
        raise UserError("train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
    return bnb.optim.AdamW8bit(params, **kwargs)

