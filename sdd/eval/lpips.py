"""LPIPS with the AlexNet backbone (Zhang et al., CVPR 2018; richzhang/PerceptualSimilarity ``lpips`` v0.1), in
plain torch: no torchvision, no lpips package, weights from one safetensors file.

    d(x0, x1) = Σ_l mean_{h,w} Σ_c w_l,c · (f̂⁰_l,chw − f̂¹_l,chw)²,   f̂ = f / (||f||_channels + 1e-10)

x0, x1 in [-1, 1] are first shifted and scaled per channel (lpips ``ScalingLayer``: shift (-.030, -.088, -.188),
scale (.458, .448, .450)); f_l are AlexNet's five ReLU outputs (relu1..relu5 of ``torchvision.models.alexnet``
``features``); w_l are the learned non-negative 1x1 "lin" heads.

Weights file (``.safetensors``) keys, named as in the two official files so that converting is a merge:

- ``features.{0,3,6,8,10}.{weight,bias}``: the conv layers of torchvision's AlexNet
  (``alexnet-owt-7be5be79.pth``, torchvision's ``AlexNet_Weights.IMAGENET1K_V1``);
- ``lin{0..4}.model.1.weight``: lpips' ``weights/v0.1/alex.pth`` (index 1: index 0 is a Dropout).

Convert once (both files are plain state dicts, so ``weights_only=True`` loads them without unpickling code)::

    import torch
    from safetensors.torch import save_file
    alex = torch.load("alexnet-owt-7be5be79.pth", weights_only=True)          # torchvision's AlexNet
    lins = torch.load("lpips/weights/v0.1/alex.pth", weights_only=True)       # from the lpips package
    tensors = {k: v for k, v in alex.items() if k.startswith("features.")} | dict(lins)
    save_file({k: v.contiguous() for k, v in tensors.items()}, "lpips_alex.safetensors")

AlexNet's ``classifier.*`` keys, if left in, are ignored.
"""

from __future__ import annotations

import os
from typing import Union

import torch
import torch.nn as nn

from sdd.errors import UserError

CHANNELS = (64, 192, 384, 256, 256)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def normalize_channels(f: torch.Tensor) -> torch.Tensor:
    """f / (sqrt(Σ_c f²) + 1e-10): unit length along the channel axis at every position (lpips.normalize_tensor)."""
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + EPS)


class _Lin(nn.Module):
    """A 1x1 conv, no bias; ``model.1`` so the state-dict key matches lpips' (``model.0`` is its Dropout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LpipsAlex(nn.Module):
    """LPIPS v0.1, AlexNet backbone. ``forward(x0, x1)`` with images Nx3xHxW in [-1, 1] returns (N,) distances."""

    def __init__(self):
        super().__init__()
        # torchvision AlexNet ``features`` indices, so its checkpoint loads unchanged
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(),  # 1 -> relu1
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),  # 4 -> relu2
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),  # 7 -> relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),  # 9 -> relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),  # 11 -> relu5
        )
        self.taps = (1, 4, 7, 9, 11)
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1..relu5 of the scaled input."""
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for i, (f0, f1) in enumerate(zip(self.activations(x0), self.activations(x1))):
            diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3))
        return total


def expected_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in LpipsAlex().state_dict().items()}


def load_lpips_alex(path: Union[str, os.PathLike]) -> LpipsAlex:
    """``LpipsAlex`` with weights from a safetensors file (keys in the module docstring); UserError if any is off."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such LPIPS weights file")
    if not path.endswith(".safetensors"):
        raise UserError(f"{path}: LPIPS weights must be a .safetensors file (see sdd/eval/lpips.py to convert)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    tensors = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    shapes = expected_shapes()
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing:
        raise UserError(f"{path}: LPIPS-AlexNet weights missing {len(missing)} key(s): {', '.join(missing[:6])}")
    if unexpected:
        raise UserError(f"{path}: unexpected key(s) for LPIPS-AlexNet: {', '.join(unexpected[:6])}")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{path}: key '{key}' has shape {tuple(tensors[key].shape)}, expected {shape}")
    net = LpipsAlex()
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    return net
