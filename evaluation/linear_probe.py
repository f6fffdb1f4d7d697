"""Linear probe on frozen features: the reference MoCo v3 recipe, and a fast path.

Reference recipe (SPEC §7, REFERENCE_NOTES §7.3): the pretrained visual encoder in a timm ViT, everything
frozen (backbone in eval mode) but a new linear head (N(0, 0.01) weights, zero bias); SGD momentum 0.9,
wd 0; lr = 0.1 x batch / 256 with the *intended* scaling (SPEC §9.6: the released script divides by the
world size instead, 0.00625 on 8 GPUs -- we do not reproduce that bug; results record `lr`), per-epoch cosine
over 90 epochs, batch 1024; train aug RandomResizedCrop + flip, eval Resize(256/224 x size) + CenterCrop.
Deviation, recorded: the head has the dataset's number of classes (the reference hard-codes 1000).

Fast path: cached frozen features + multinomial logistic regression (lbfgs, deterministic) with the inverse
regularisation C swept on a stratified held-out split of the train set, then refit on all of train with the
chosen C. Same inputs -> same number, bit for bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from threadpoolctl import threadpool_limits

from evaluation import common, metrics
from slip_core import augment
from slip_core.features import autocast, extract


# ------------------------------------------------------------------------------------------ fast path
@dataclass
class FastProbeConfig:
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    val_fraction: float = 0.2
    max_iter: int = 300
    seed: int = 0


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 metric: str = "top1", cfg: FastProbeConfig | None = None) -> dict:
    """Sweep C on a held-out split of train, refit on all train, score test with the dataset's metric."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    cfg = cfg or FastProbeConfig()
    tr, va = train_test_split(np.arange(len(y_train)), test_size=cfg.val_fraction, random_state=cfg.seed,
                              stratify=y_train)

    def fit(idx: np.ndarray, C: float):
        scaler = StandardScaler().fit(x_train[idx])  # features of different checkpoints differ wildly in scale
        clf = LogisticRegression(C=C, max_iter=cfg.max_iter)
        with warnings.catch_warnings(), threadpool_limits(1):
            # one BLAS thread: lbfgs stopped at max_iter is then bit-reproducible (and 5x faster on a busy box)
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(scaler.transform(x_train[idx]), y_train[idx])
        return scaler, clf

    def score(model, x, y) -> float:
        scaler, clf = model
        return metrics.compute(metric, _full_logits(clf, scaler.transform(x), n_classes), y)["value"]

    n_classes = int(max(y_train.max(), y_test.max())) + 1
    val_scores = {C: score(fit(tr, C), x_train[va], y_train[va]) for C in cfg.Cs}
    best_C = max(cfg.Cs, key=lambda C: (val_scores[C], -C))  # ties -> the stronger regularisation
    final = fit(np.arange(len(y_train)), best_C)
    test = metrics.compute(metric, _full_logits(final[1], final[0].transform(x_test), n_classes), y_test)
    return {"metric": metric, **test, "best_C": best_C, "val_scores": {str(k): v for k, v in val_scores.items()},
            "num_train": int(len(y_train)), "num_samples": int(len(y_test))}


def _full_logits(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Log-probabilities over all classes (columns for classes absent from a train split stay -inf)."""
    out = np.full((len(x), n_classes), -np.inf)
    with np.errstate(divide="ignore"), threadpool_limits(1):
        out[:, clf.classes_] = clf.predict_log_proba(x)
    return out


def fast_probe(lm: common.LoadedModel, train, test, cfg: FastProbeConfig | None = None, batch_size: int = 256,
               num_workers: int = 0, cache_dir: str | None = None, dataset_sha256: str = "",
               device: torch.device | str = "cpu") -> dict | None:
    """`train`/`test`: catalog.Loaded splits built with `common.probe_eval_transform(image_size)`. Under
    torchrun the features are extracted across ranks and rank 0 fits; the other ranks return None."""
    xtr, ytr = common.features(lm, train, "visual", batch_size, num_workers, cache_dir, dataset_sha256, device)
    xte, yte = common.features(lm, test, "visual", batch_size, num_workers, cache_dir, dataset_sha256, device)
    if xtr is None:
        return None
    out = fit_logistic(xtr, ytr, xte, yte, test.entry.metric, cfg)
    return {**out, "chance": test.entry.chance(), "recipe": "fast: cached features + logistic regression"}


# ------------------------------------------------------------------------------------ reference recipe
@dataclass
class ReferenceProbeConfig:
    epochs: int = 90
    batch_size: int = 1024  # total
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256 (intended MoCo v3 scaling, SPEC §9.6)
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_every: int = 10
    num_workers: int = 8
    seed: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


class RandomResizedCropFlip:
    """Probe train aug (MoCo v3): RandomResizedCrop(size, (0.08, 1)) + horizontal flip, on a PIL image."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, np.random.default_rng(seed)

    def __call__(self, img) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB"))
        box = augment.random_resized_crop_box(arr.shape[0], arr.shape[1], (0.08, 1.0), (3 / 4, 4 / 3), self.rng)
        out = augment.crop_resize(arr, box, self.size)
        if self.rng.random() < 0.5:
            out = out[:, ::-1]
        return augment.normalize(augment.to_float_chw(np.ascontiguousarray(out)))

    def __repr__(self) -> str:
        return f"RandomResizedCropFlip(size={self.size})"


class FrozenProbe(nn.Module):
    """Frozen visual encoder (final-LayerNorm'd class token) + a trainable linear head."""

    def __init__(self, visual: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.visual = visual.requires_grad_(False)
        self.head = nn.Linear(width, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()  # the backbone stays in eval mode throughout (reference)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device):  # bf16 backbone on CUDA; the head trains in fp32
            f = self.visual(x).float()
        return self.head(f)


def reference_probe(lm: common.LoadedModel, train, test, cfg: ReferenceProbeConfig | None = None,
                    log=print, device: torch.device | str = "cpu") -> dict:
    """Train the head with the reference recipe; `train` built with RandomResizedCropFlip, `test` with
    `common.probe_eval_transform`. One process (the head is tiny; the frozen forward dominates), on `device`."""
    cfg = cfg or ReferenceProbeConfig()
    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    probe = FrozenProbe(lm.on(device).visual, lm.model.config.vision_width, test.entry.num_classes).to(device)
    frozen = {k: v.clone() for k, v in probe.visual.state_dict().items()}
    opt = torch.optim.SGD(probe.head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(train.dataset, batch_size=cfg.batch_size, shuffle=True, generator=g,
                                               num_workers=cfg.num_workers, drop_last=False,
                                               pin_memory=device.type == "cuda")
    history = []
    for epoch in range(cfg.epochs):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))  # per-epoch cosine, no warmup
        for group in opt.param_groups:
            group["lr"] = lr
        probe.train()
        for images, y in train_loader:
            y = torch.as_tensor(y).to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(probe(images.to(device, non_blocking=True)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            probe.eval()
            logits, labels = extract(probe, test.dataset, batch_size=256, num_workers=cfg.num_workers, device=device)
            res = metrics.compute(test.entry.metric, logits, labels)
            history.append({"epoch": epoch + 1, "lr": lr, "loss": loss.item(), **res})
            log(f"linear probe epoch {epoch + 1}/{cfg.epochs}: loss {loss.item():.4f} {test.entry.metric} {res['value']:.2f}")
    # the sanity check the reference meant to run (REFERENCE_NOTES §7.3 bug 3): the backbone did not move
    for k, v in probe.visual.state_dict().items():
        if not torch.equal(v, frozen[k]):
            raise RuntimeError(f"frozen backbone weight {k} changed during the linear probe")
    final = history[-1]
    return {"metric": test.entry.metric, **{k: v for k, v in final.items() if k not in ("epoch", "loss")},
            "best_value": max(h["value"] for h in history), "history": history, "lr": cfg.lr,
            "num_samples": int(len(labels)), "chance": test.entry.chance(),
            "recipe": "reference MoCo v3 probe, intended lr scaling (SPEC §9.6)"}
