"""SLIP's reference augmentations (SPEC §5), fast: decode once, then the CLIP view and two SSL views.

The reference decodes every image at full size with PIL and runs three PIL pipelines. We keep the same
recipe and parameters, but
  * decode once per sample, with JPEG draft decoding (libjpeg DCT scaling) so a large photo is decoded
    directly at the smallest power-of-two reduction whose short side still covers the output size,
  * crop + resize each view on the uint8 array with OpenCV (INTER_AREA when shrinking = antialiased, like
    PIL's bilinear resize; INTER_LINEAR when enlarging), so every later op touches only `size`² pixels,
  * colour jitter / grayscale / blur / flip on the small float tensor with torchvision.transforms.v2,
  * draw every random parameter from an explicit numpy Generator handed in by the loader, so a sample's
    views depend only on (seed, epoch, rank, worker, position) — required for exact resume.
Differences from the reference, all documented options of fidelity not of recipe: colour ops run in float
without re-quantising to uint8 between ops; blur is a true Gaussian (kernel 2⌈3σ⌉+1) instead of PIL's
3-box approximation; draft decoding can be turned off (`draft=False`) to decode at full size.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (SPEC §5), not OpenAI CLIP's
STD = (0.229, 0.224, 0.225)
VIEWS_BY_KIND = {"clip": ("image",), "simclr": ("aug1", "aug2"), "slip": ("image", "aug1", "aug2")}


class BadImage(ValueError):
    """A sample's image cannot be used; `reason` is the counter it is recorded under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class AugmentConfig:
    image_size: int = 224
    clip_scale: tuple[float, float] = (0.5, 1.0)  # SLIP's improved CLIP view
    ssl_scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    max_pixels: int = 89_478_485  # PIL's own bomb threshold; bigger images are skipped, never decoded
    draft: bool = True


# ---------------------------------------------------------------------------------------------- decode
def decode_image(data: bytes, max_pixels: int = AugmentConfig.max_pixels, min_side: int = 0) -> np.ndarray:
    """Bytes -> RGB uint8 array [H, W, 3]. Reads the header first and refuses images above `max_pixels`
    (decompression bombs); `min_side > 0` lets libjpeg decode at a reduced scale whose short side is
    still >= min_side. Raises BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage("too_large", f"{w}x{h} > {max_pixels} pixels")
            if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
                # draft keeps the scaled size >= the requested one; ask for the aspect-preserving size.
                s = min_side / min(w, h)
                img.draft("RGB", (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            arr = np.asarray(img.convert("RGB"))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except Exception as e:  # truncated / not an image / unsupported mode: skip and count
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImage("corrupt", f"bad shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------- views
def random_resized_crop_box(h: int, w: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params algorithm (10 tries, then a centre crop) on our RNG."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_resize(arr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, ch, cw = box
    crop = arr[top:top + ch, left:left + cw]
    interp = cv2.INTER_AREA if (ch > size or cw > size) else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def to_float_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


_MEAN_T = torch.tensor(MEAN).view(3, 1, 1)
_STD_T = torch.tensor(STD).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(_MEAN_T).div_(_STD_T)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """ColorJitter(b, c, s, h): factors drawn first, ops applied in a random order (as torchvision)."""
    b, c, s, h = cfg.jitter
    order = rng.permutation(4)
    fb, fc, fs = (rng.uniform(max(0.0, 1 - v), 1 + v) for v in (b, c, s))
    fh = rng.uniform(-h, h)
    for op in order:
        if op == 0:
            x = TF.adjust_brightness(x, fb)
        elif op == 1:
            x = TF.adjust_contrast(x, fc)
        elif op == 2:
            x = TF.adjust_saturation(x, fs)
        else:
            x = TF.adjust_hue(x, fh)
    return x


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # kernel must fit the image
    return TF.gaussian_blur(x, [k, k], [sigma, sigma]) if k >= 3 else x


def clip_view(arr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    box = random_resized_crop_box(arr.shape[0], arr.shape[1], cfg.clip_scale, cfg.ratio, rng)
    return normalize(to_float_chw(crop_resize(arr, box, cfg.image_size)))


def ssl_view(arr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    box = random_resized_crop_box(arr.shape[0], arr.shape[1], cfg.ssl_scale, cfg.ratio, rng)
    x = to_float_chw(crop_resize(arr, box, cfg.image_size))
    if rng.random() < cfg.jitter_p:
        x = color_jitter(x, cfg, rng)
    if rng.random() < cfg.gray_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if rng.random() < cfg.blur_p:
        x = gaussian_blur(x, float(rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.flip_p:
        x = x.flip(-1)
    return normalize(x.contiguous())


def make_views(arr: np.ndarray, views: tuple[str, ...], cfg: AugmentConfig, rng: np.random.Generator) -> dict:
    """All requested views of one decoded image: 'image' (CLIP view), 'aug1', 'aug2' (SSL views)."""
    out = {}
    for v in views:
        out[v] = clip_view(arr, cfg, rng) if v == "image" else ssl_view(arr, cfg, rng)
    return out


def val_transform(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    """Reference val/zero-shot transform: resize short side to `size`, centre crop, normalise."""
    h, w = arr.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return normalize(to_float_chw(arr[top:top + size, left:left + size]))
