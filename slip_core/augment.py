"""SLIP's reference augmentations (SPEC §5), fast: decode once, then the CLIP view and two SSL views.

The reference decodes every image at full size with PIL and runs three PIL pipelines. We keep the same
recipe and parameters, but
  * decode once per sample, with JPEG draft decoding (libjpeg DCT scaling) so a large photo is decoded
    directly at the smallest power-of-two reduction whose short side still covers the output size,
  * crop + resize each view on the uint8 array with OpenCV (INTER_AREA when shrinking by >= 2x =
    antialiased, like PIL's bilinear resize; INTER_LINEAR otherwise), so later ops touch only `size`² pixels,
  * colour jitter / grayscale / blur / flip on the small uint8 crop with OpenCV, re-quantised after each op
    like the reference's PIL ops (OpenCV's HSV and Gaussian kernels differ from PIL's by rounding only),
  * hand views over as uint8 CHW tensors (ToTensor + Normalize run batched on the training device,
    `normalize_uint8_batch`); `uint8=False` gives normalised float32 views instead,
  * draw every random parameter from an explicit numpy Generator handed in by the loader, so a sample's
    views depend only on (seed, epoch, rank, worker, position) — required for exact resume.
Differences from the reference (fidelity, not recipe): blur is a true Gaussian (kernel 2⌈3σ⌉+1) instead of
PIL's 3-box approximation; OpenCV's area/bilinear resampling instead of PIL's; decoding at a reduced
scale (`draft=False` decodes at full size). Measured: bench/loader.py.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

# One OpenCV thread: parallelism comes from DataLoader workers, and OpenCV's own thread pool does not
# survive fork() (a worker forked after the parent used a multi-threaded cv2 op hangs in its first resize).
cv2.setNumThreads(1)

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (SPEC §5), not OpenAI CLIP's
STD = (0.229, 0.224, 0.225)


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
    # INTER_AREA (antialiased) only when shrinking by >= 2x; below that bilinear barely aliases and is ~5x faster
    interp = cv2.INTER_AREA if (ch >= 2 * size or cw >= 2 * size) else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def to_float_chw(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1], contiguous (non-contiguous views make torch.stack ~10x slower)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)).div_(255.0)


_MEAN_T = torch.tensor(MEAN).view(3, 1, 1)
_STD_T = torch.tensor(STD).view(3, 1, 1)
_SCALE = (1.0 / (255.0 * np.asarray(STD))).astype(np.float32)
_OFFSET = (np.asarray(MEAN) / np.asarray(STD)).astype(np.float32)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(_MEAN_T).div_(_STD_T)


def to_uint8_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def normalize_uint8_batch(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] (on any device) -> normalised float32; the loader's `uint8=True` output is
    finished here, on the accelerator, so workers ship 4x fewer bytes and skip the float pass."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.float().div_(255.0).sub_(mean).div_(std)


def to_normalized(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> normalised float32 CHW in one pass: x / 255 / std - mean / std (= ToTensor + Normalize)."""
    x = arr.astype(np.float32)
    x *= _SCALE
    x -= _OFFSET
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# Colour ops on uint8 HWC arrays with OpenCV, each re-quantised to uint8 exactly like the reference's PIL
# ImageEnhance / HSV ops (torchvision's PIL path): factor blends with black / the mean grey / the grey image.
def adjust_brightness(a: np.ndarray, f: float) -> np.ndarray:
    return cv2.addWeighted(a, f, a, 0.0, 0.0)


def adjust_contrast(a: np.ndarray, f: float) -> np.ndarray:
    mean = int(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).mean() + 0.5)
    return cv2.addWeighted(a, f, a, 0.0, mean * (1.0 - f))


def adjust_saturation(a: np.ndarray, f: float) -> np.ndarray:
    gray = cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(a, f, gray, 1.0 - f, 0.0)


def adjust_hue(a: np.ndarray, h: float) -> np.ndarray:
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV_FULL)  # hue on 0..255, as PIL's HSV mode
    hsv[..., 0] += np.uint8(int(h * 255) % 256)  # uint8 wrap-around = rotation of the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(a: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    k = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(a, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def color_jitter(a: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """ColorJitter(b, c, s, h): factors drawn first, ops applied in a random order (as torchvision)."""
    b, c, s, h = cfg.jitter
    order = rng.permutation(4)
    fb, fc, fs = (rng.uniform(max(0.0, 1 - v), 1 + v) for v in (b, c, s))
    fh = rng.uniform(-h, h)
    for op in order:
        a = (adjust_brightness(a, fb) if op == 0 else adjust_contrast(a, fc) if op == 1
             else adjust_saturation(a, fs) if op == 2 else adjust_hue(a, fh))
    return a


def clip_view(arr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, uint8: bool = False) -> torch.Tensor:
    box = random_resized_crop_box(arr.shape[0], arr.shape[1], cfg.clip_scale, cfg.ratio, rng)
    a = crop_resize(arr, box, cfg.image_size)
    return to_uint8_chw(a) if uint8 else to_normalized(a)


def ssl_view(arr: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, uint8: bool = False) -> torch.Tensor:
    box = random_resized_crop_box(arr.shape[0], arr.shape[1], cfg.ssl_scale, cfg.ratio, rng)
    a = crop_resize(arr, box, cfg.image_size)
    if rng.random() < cfg.jitter_p:
        a = color_jitter(a, cfg, rng)
    if rng.random() < cfg.gray_p:
        a = to_grayscale(a)
    if rng.random() < cfg.blur_p:
        a = gaussian_blur(a, float(rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.flip_p:
        a = a[:, ::-1]
    return to_uint8_chw(a) if uint8 else to_normalized(a)


def make_views(arr: np.ndarray, views: tuple[str, ...], cfg: AugmentConfig, rng: np.random.Generator,
               uint8: bool = False) -> dict:
    """All requested views of one decoded image: 'image' (CLIP view), 'aug1', 'aug2' (SSL views);
    normalised float32 CHW, or uint8 CHW with `uint8=True` (finish with normalize_uint8_batch)."""
    out = {}
    for v in views:
        out[v] = clip_view(arr, cfg, rng, uint8) if v == "image" else ssl_view(arr, cfg, rng, uint8)
    return out


def val_transform(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    """Reference val/zero-shot transform: resize short side to `size`, centre crop, normalise."""
    h, w = arr.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    arr = cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return to_normalized(arr[top:top + size, left:left + size])
