"""A tiny CLIP that has actually learned, for the evaluation tests.

CLIP_VIT_TINY (64 px) trained in-process on captioned real images: Fashion-MNIST TRAIN images, captions
"a photo of a {class}." and variants, the reference CLIP loss (`slip_core.losses.build_loss`) and AdamW with
warmup + cosine. Held-out evaluation uses the Fashion-MNIST TEST split, which training never sees.
The text context is cut to 16 tokens (every caption fits) to keep the text tower cheap on 2 CPU cores.
Trained once per test session (memoised) and saved with `slip_core.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from datasets.offline import FASHION_CLASSES, fashion_mnist
from slip_core import augment
from slip_core.checkpoint import save_checkpoint
from slip_core.registry import build_loss, build_model
from slip_core.optim import LOGIT_SCALE_MAX
from slip_core.tokenizer import tokenize

CAPTION_TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}.", "a black and white photo of a {}.",
                     "{}", "my {}.", "a product photo of a {}.", "a small {}."]
MEAN = torch.tensor(augment.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(augment.STD).view(1, 3, 1, 1)


def to_model_input(u8: np.ndarray, size: int = 64) -> torch.Tensor:
    """uint8 [N, H, W] grayscale -> normalised [N, 3, size, size] (bilinear upscale)."""
    t = torch.from_numpy(u8).float().div(255).unsqueeze(1)
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (t - MEAN) / STD


def train_tiny_clip(out_path: str, steps: int = 250, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                    context_length: int = 16, verbose: bool = False) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("CLIP_VIT_TINY", context_length=context_length)
    loss_fn = build_loss("clip")
    images, labels = fashion_mnist("train")
    captions = [t.format(c) for c in FASHION_CLASSES for t in CAPTION_TEMPLATES]
    tokens = tokenize(captions, context_length=context_length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8)
    warmup, t0, cpu0, losses = 20, time.time(), time.process_time(), []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.choice(len(images), batch_size, replace=False)
        cap = labels[idx] * len(CAPTION_TEMPLATES) + rng.integers(len(CAPTION_TEMPLATES), size=batch_size)
        # encode each distinct caption once (a batch repeats captions), then gather per sample
        uniq, inverse = np.unique(cap, return_inverse=True)
        img_emb = model.encode_image(to_model_input(images[idx]))
        txt_emb = model.encode_text(tokens[uniq])[torch.from_numpy(inverse)]
        out = loss_fn({"image_embed": img_emb, "text_embed": txt_emb, "logit_scale": model.logit_scale.exp()})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(out["loss"].item())
        if verbose and step % 25 == 0:
            print(f"step {step} loss {losses[-1]:.3f} {time.time() - t0:.1f}s", flush=True)
    model.eval()
    save_checkpoint(out_path, model, train_steps=steps, train_data="fashion_mnist train, templated captions")
    return {"path": out_path, "steps": steps, "first_loss": float(np.mean(losses[:10])),
            "last_loss": float(np.mean(losses[-10:])), "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - cpu0}


@functools.lru_cache(maxsize=1)
def tiny_checkpoint() -> dict:
    """Train once per session; returns {"path", "steps", "first_loss", "last_loss", "wall_s", "cpu_s"}."""
    # One intra-op thread: on a shared 2-core box busy-waiting OpenMP threads make a step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = os.path.join(tempfile.mkdtemp(prefix="slip-eval-tiny-"), "checkpoint.pt")
    try:
        info = train_tiny_clip(out)
    finally:
        torch.set_num_threads(threads)
    print(f"[eval fixture] trained tiny CLIP: {info}")
    return info


@functools.lru_cache(maxsize=1)
def random_checkpoint() -> str:
    """The same architecture, untrained (for 'beats random features' comparisons)."""
    torch.manual_seed(1234)
    out = os.path.join(tempfile.mkdtemp(prefix="slip-eval-rand-"), "checkpoint.pt")
    save_checkpoint(out, build_model("CLIP_VIT_TINY", context_length=16).eval())
    return out
