"""Images in, one format out: every detector and metric accepts PIL images, arrays, tensors or file paths.

- PIL image: any mode, converted to RGB (alpha dropped, not composited).
- numpy array: HxWx3 (or HxW grey) RGB, uint8 in [0, 255] or float in [0, 1].
- torch tensor: 3xHxW RGB float in [0, 1] (diffusers' ``output_type="pt"``).
- str / os.PathLike: an image file, opened with PIL.
"""

from __future__ import annotations

import os
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdd.errors import UserError

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]
Resample = Literal["bicubic", "bilinear"]
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_rgb(image: ImageInput) -> Image.Image:
    """One image as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"{os.fspath(image)}: no such image file") from None
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{os.fspath(image)}: not a readable image ({err})") from None
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected a 3xHxW image tensor, got shape {tuple(image.shape)}")
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"expected an HxWx3 RGB array, got shape {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.dtype != np.uint8:
            # float images are [0, 1]; round like diffusers' numpy_to_pil does
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}")


def load_rgb_many(images: Sequence[ImageInput]) -> list[Image.Image]:
    return [load_rgb(im) for im in images]


def to_bgr_uint8(image: ImageInput) -> np.ndarray:
    """HxWx3 uint8 in BGR order: what OpenCV's ``imread`` returns and what NudeNet expects of an array."""
    return np.ascontiguousarray(np.asarray(load_rgb(image))[:, :, ::-1])


def resize_center_crop(image: Image.Image, size: int, resample: Resample = "bicubic") -> Image.Image:
    """torchvision ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image, without torchvision.

    The shorter side becomes ``size`` (the longer one ``int(size * long / short)``), PIL's antialiased filter;
    then the central size x size square, offsets ``int(round((side - size) / 2))`` as torchvision rounds them.
    """
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _RESAMPLE[resample])
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Nx3xHxW float in [0, 1] (torchvision's ``ToTensor``); all images must share one size."""
    arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
