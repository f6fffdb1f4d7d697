"""SLIP-BEiT: BEiT-style masked image modelling as SLIP's SSL branch (paper Table 6; kind "slip_beit").

Each SSL view (aug1 and aug2, SPEC §5 — both are used, so a step costs SLIP's three ViT passes) is masked
with BEiT's blockwise algorithm (`block_mask`: rectangles of >= `mim_min_block` patches, aspect ratio in
[0.3, 1/0.3], until `mim_mask_ratio` of the patches are masked), masked patch embeddings are replaced by a
learned `mim_mask_token`, the SHARED ViT (`visual`, also the CLIP image tower) encodes the sequence, and
`mim_head` (Linear, width → vocabulary) predicts, at every masked position, the discrete visual token that
a frozen tokenizer assigns to the unmasked view. Loss: cross-entropy over masked positions.

The visual tokenizer — NOT DALL-E's dVAE unless you provide it:
* `mim_tokenizer = ""` (default): a random-projection quantizer in the spirit of BEST-RQ (Chiu et al.
  2022): each patch is average-pooled to a 4x4 RGB grid (48 numbers of the normalised image), projected
  by a fixed random matrix, L2-normalised, and assigned the nearest (cosine) of `mim_vocab` fixed random
  unit codewords. Seeded, data-free, stored in the state dict (buffers), so checkpoints carry it.
* `mim_tokenizer = "path/to/codebook.pt"`: our codebook file (`save_tokenizer`), e.g. a k-means codebook
  over patch features of the training images (`fit_kmeans_tokenizer`, scikit-learn's KMeans).
* `mim_tokenizer = "path/to/encoder.pkl"`: DALL-E's dVAE encoder as BEiT uses it, loaded with OpenAI's
  `dall_e` package (`pip install DALL-E`; not a dependency of this project, and not exercised by our tests
  since the weights cannot be fetched here). OpenAI's file is a pickled module: it is unpickled in full,
  so point this only at a file you trust. The image is un-normalised, resized to 8 px per ViT patch,
  `map_pixels`-ed, and tokens are the argmax of the encoder's logits (BEiT). Its weights stay outside our
  state dict; the checkpoint records the path.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import checkpoint_seq

from slip_core.augment import MEAN, STD
from slip_core.losses import LossOptions, accuracy, upcast
from slip_core.models import CLIP, ModelConfig, vit_presets
from slip_core.ssl_variants import SLIPVariantLoss
from slip_core.train_spec import SLIP_SPEC, register_train_spec

TOKENIZER_FORMAT = "slip-pipeline/mim-tokenizer/1"


# ------------------------------------------------------------------------------------------- masking
def block_mask(height: int, width: int, num_masked: int, rng: np.random.Generator, min_block: int = 16,
               min_aspect: float = 0.3, max_block: int | None = None) -> np.ndarray:
    """BEiT's MaskingGenerator: add random rectangles (area U(min_block, remaining), log-uniform aspect
    ratio, 10 tries each) until `num_masked` patches are masked or no rectangle adds any. bool [h, w]."""
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    max_block = num_masked if max_block is None else max_block
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        delta = 0
        for _ in range(10):
            area = min_block + (budget - min_block) * rng.random()  # random.uniform: budget may be < min_block
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:  # BEiT: only if it adds patches without overshooting
                    mask[top:top + h, left:left + w] = True
                    delta = new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


# ------------------------------------------------------------------------------------------- tokenizers
def patch_features(images: torch.Tensor, patch_size: int, pool: int = 4) -> torch.Tensor:
    """[N, 3, H, W] → [N, L, 3·pool²]: each patch average-pooled to a pool×pool RGB grid (row-major patches,
    the ViT's patch order)."""
    n, c, hgt, wid = images.shape
    if patch_size % pool:
        raise ValueError(f"patch_size {patch_size} must be a multiple of pool {pool}")
    x = F.avg_pool2d(images, patch_size // pool)  # [N, C, gh·pool, gw·pool]
    gh, gw = hgt // patch_size, wid // patch_size
    x = x.view(n, c, gh, pool, gw, pool).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, gh * gw, c * pool * pool)


class PatchQuantizer(nn.Module):
    """tokens = argmax_k cos(patch_features(x) @ proj, codebook_k). Buffers only: frozen, in the state dict."""

    def __init__(self, vocab: int, patch_size: int, pool: int = 4, code_dim: int | None = None, seed: int = 0):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        in_dim = 3 * pool * pool
        code_dim = code_dim or in_dim  # same buffer shapes as a k-means codebook: checkpoints load either
        g = torch.Generator().manual_seed(seed)  # independent of the global RNG: same tokenizer for every run
        self.register_buffer("proj", torch.randn(in_dim, code_dim, generator=g) / math.sqrt(in_dim))
        self.register_buffer("codebook", F.normalize(torch.randn(vocab, code_dim, generator=g), dim=-1))

    @property
    def vocab(self) -> int:
        return self.codebook.shape[0]

    def set_codebook(self, proj: torch.Tensor, codebook: torch.Tensor) -> None:
        if codebook.shape[0] != self.vocab or proj.shape[0] != self.proj.shape[0] or proj.shape[1] != codebook.shape[1]:
            raise ValueError(f"tokenizer shapes proj {tuple(proj.shape)} codebook {tuple(codebook.shape)} do not fit "
                             f"vocab {self.vocab}, input dim {self.proj.shape[0]}")
        self.proj = proj.float().clone()
        self.codebook = F.normalize(codebook.float(), dim=-1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):  # tokens must not depend on the precision
            feats = patch_features(images.to(self.proj.dtype), self.patch_size, self.pool)
            z = F.normalize(feats @ self.proj, dim=-1)
            return (z @ self.codebook.t()).argmax(dim=-1)


def fit_kmeans_tokenizer(images: torch.Tensor, vocab: int, patch_size: int, pool: int = 4,
                         seed: int = 0, max_patches: int = 200_000) -> PatchQuantizer:
    """A codebook learned from real images: scikit-learn k-means on L2-normalised patch features
    (identity projection), i.e. spherical k-means up to the centroid re-normalisation."""
    from sklearn.cluster import KMeans

    feats = F.normalize(patch_features(images, patch_size, pool).reshape(-1, 3 * pool * pool), dim=-1)
    if feats.shape[0] > max_patches:
        feats = feats[torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))[:max_patches]]
    if feats.shape[0] < vocab:
        raise ValueError(f"{feats.shape[0]} patches are too few for a {vocab}-token codebook")
    km = KMeans(n_clusters=vocab, n_init=1, random_state=seed, max_iter=100).fit(feats.numpy())
    q = PatchQuantizer(vocab, patch_size, pool)
    q.set_codebook(torch.eye(3 * pool * pool), torch.from_numpy(km.cluster_centers_))
    return q


def save_tokenizer(path: str, q: PatchQuantizer) -> None:
    from slip_core import storage

    with storage.atomic_open(str(path), "wb") as f:
        torch.save({"format": TOKENIZER_FORMAT, "patch_size": q.patch_size, "pool": q.pool,
                    "proj": q.proj, "codebook": q.codebook}, f)


def load_tokenizer_state(path: str) -> dict:
    """A `save_tokenizer` file, loaded safely (weights_only: tensors, numbers and strings only)."""
    import io

    from slip_core import storage

    if not storage.exists(str(path)):
        raise FileNotFoundError(f"MIM tokenizer not found: {path}")
    return torch.load(io.BytesIO(storage.read_bytes(str(path))), map_location="cpu", weights_only=True)


def _load_dalle_encoder(path: str) -> nn.Module:
    """Load OpenAI's dVAE encoder.pkl with torch's restricted unpickler and an explicit allow-list."""
    import collections
    import functools

    import dall_e.encoder as dalle_encoder
    import dall_e.utils as dalle_utils

    allowed = [collections.OrderedDict, functools.partial, nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity,
               nn.Upsample, torch.device]
    for mod in (dalle_encoder, dalle_utils):
        allowed += [v for v in vars(mod).values() if isinstance(v, type) and v.__module__ == mod.__name__]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an object outside the allow-list: refuse rather than run it
            raise RuntimeError(f"{path}: refusing to unpickle objects outside the DALL-E encoder allow-list ({e})") from e


class DallETokenizer(nn.Module):
    """DALL-E dVAE encoder from a local `encoder.pkl` (needs OpenAI's `dall_e` package; see module doc)."""

    def __init__(self, path: str, grid: int):
        super().__init__()
        try:
            from dall_e import map_pixels
        except ImportError as e:
            raise ImportError(f"{path} looks like a DALL-E dVAE encoder; loading it needs OpenAI's `dall_e` "
                              f"package (pip install DALL-E)") from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DALL-E dVAE encoder not found: {path}")
        # OpenAI's file is a whole pickled module (what dall_e.load_model reads). We still never unpickle
        # arbitrary objects: only the dall_e encoder classes and torch's own layers are allow-listed.
        encoder = _load_dalle_encoder(path)
        # kept out of our state dict and module tree (its weights are the user's file, not ours)
        object.__setattr__(self, "encoder", encoder.eval().requires_grad_(False))
        self.map_pixels, self.grid = map_pixels, grid

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (MEAN, STD))
        x = (images.float() * std + mean).clamp(0, 1)
        x = F.interpolate(x, size=(self.grid * 8, self.grid * 8), mode="bilinear", align_corners=False)
        enc = self.encoder.to(images.device)
        return enc(self.map_pixels(x)).argmax(dim=1).flatten(1)


def build_tokenizer(cfg: ModelConfig) -> nn.Module:
    grid = cfg.image_size // cfg.patch_size
    path = cfg.mim_tokenizer
    if path.endswith(".pkl"):
        return DallETokenizer(path, grid)
    q = PatchQuantizer(cfg.mim_vocab, cfg.patch_size)
    if path:
        state = load_tokenizer_state(path)
        if not isinstance(state, dict) or state.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"{path} is not a tokenizer file (format {state.get('format')!r})")
        q = PatchQuantizer(cfg.mim_vocab, int(state["patch_size"]), int(state["pool"]), state["proj"].shape[1])
        q.set_codebook(state["proj"], state["codebook"])
    if q.patch_size != cfg.patch_size:
        raise ValueError(f"tokenizer patch size {q.patch_size} != model patch size {cfg.patch_size}")
    return q


# ------------------------------------------------------------------------------------------- model
class SLIPBEiT(CLIP):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        if cfg.mim_vocab < 2 or not 0.0 < cfg.mim_mask_ratio < 1.0:
            raise ValueError(f"{cfg.name}: needs mim_vocab >= 2 and 0 < mim_mask_ratio < 1")
        self.grid = cfg.image_size // cfg.patch_size
        self.num_masked = int(round(cfg.mim_mask_ratio * self.grid * self.grid))
        if cfg.mim_min_block > self.num_masked:
            raise ValueError(f"{cfg.name}: mim_min_block {cfg.mim_min_block} > masked patches {self.num_masked}")
        self.mim_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.mim_head = nn.Linear(cfg.vision_width, cfg.mim_vocab)
        nn.init.trunc_normal_(self.mim_mask_token, std=0.02)  # BEiT's init of mask token and LM head
        nn.init.trunc_normal_(self.mim_head.weight, std=0.02)
        nn.init.zeros_(self.mim_head.bias)
        self.mim_tokenizer = build_tokenizer(cfg)

    def sample_masks(self, n: int, device) -> torch.Tensor:
        """[n, L] bool. Randomness from the global torch RNG (seeded per rank, saved by trainer checkpoints)."""
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)).item()))
        m = np.stack([block_mask(self.grid, self.grid, self.num_masked, rng, self.config.mim_min_block).reshape(-1)
                      for _ in range(n)])
        return torch.from_numpy(m).to(device)

    def encode_masked(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch tokens [N, L, D] of the shared timm ViT with masked patch embeddings replaced
        (timm's `forward_features`, with the mask applied between patch embedding and position embedding)."""
        v = self.visual
        x = v.patch_embed(image)
        x = torch.where(mask.unsqueeze(-1), self.mim_mask_token.to(x.dtype).expand_as(x), x)
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))
        x = checkpoint_seq(v.blocks, x) if v.grad_checkpointing and self.training else v.blocks(x)
        x = v.norm(x)
        return x[:, v.num_prefix_tokens:]

    def mim(self, view: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [M, vocab], target tokens [M]) at the M masked positions of a batch of views."""
        mask = self.sample_masks(view.shape[0], view.device) if mask is None else mask
        targets = self.mim_tokenizer(view)
        return self.mim_head(self.encode_masked(view, mask)[mask]), targets[mask]

    def forward(self, image: torch.Tensor, text: torch.Tensor, aug1: torch.Tensor,
                aug2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image, text)
        l1, t1 = self.mim(aug1)
        l2, t2 = self.mim(aug2)
        out["mim_logits"], out["mim_targets"] = torch.cat([l1, l2]), torch.cat([t1, t2])
        return out


class MIMLoss(nn.Module):
    """Cross-entropy of the visual token at masked positions (BEiT); accuracy in % over those positions."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, targets = upcast(outputs["mim_logits"]), outputs["mim_targets"]
        loss = F.cross_entropy(logits, targets)
        return {"loss": loss, "ssl_loss": loss.detach(), "ssl_acc": accuracy(logits, targets)}


def build_mim_loss(opts: LossOptions) -> SLIPVariantLoss:
    return SLIPVariantLoss(MIMLoss(), opts.ssl_scale, opts.clip_gather_with_grad)


# BEiT masks 40 % of the patches in blocks of >= 16 with DALL-E's 8192-token vocabulary; tiny (an 8x8 grid):
# blocks of >= 4 patches (BEiT's MaskingGenerator default) and 256 tokens.
BEIT_SPEC = register_train_spec(dataclasses.replace(
    SLIP_SPEC, kind="slip_beit", build_model=SLIPBEiT, build_loss=build_mim_loss,
    presets=vit_presets("slip_beit", "SLIP_BEIT", dict(mim_vocab=8192, mim_mask_ratio=0.4, mim_min_block=16),
                        dict(mim_vocab=256, mim_mask_ratio=0.4, mim_min_block=4), backbones=("VITB16",))))
