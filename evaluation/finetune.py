"""End-to-end fine-tuning of the pretrained ViT, BEiT recipe (SPEC §7, REFERENCE_NOTES §7.4).

Launched with torchrun (`launch(...)` builds the command; `python -m evaluation.finetune` is the
per-rank entry point). Each rank puts the classifier on its local device (`cuda:LOCAL_RANK` when CUDA is
there and `device` allows it, else CPU) before wrapping it in DDP — over NCCL on GPU, gloo on CPU — and trains
under bf16 autocast on GPU (fp32 on CPU). Like pretraining it keeps one TrainState (slip_core/train_state.py:
model, optimizer, scaler, step, every rank's RNG, the epoch reached, the metric history) and checkpoints it
every `save_every` epochs (and on the last) to `<out>/checkpoint.pt` in the pretraining checkpoint format
(`task: "finetune"`, the backbone's model config, the classifier's weights), resuming from it automatically.
Per-epoch metrics go to `<out>/metrics.jsonl`; the final result to `<out>/result.json`.

Recipe: timm ViT with the pretrained `visual.*` weights (class-token pooling, absolute position embeddings,
no layer scale), new head trunc-normal(0.02) x 0.001; AdamW (0.9, 0.999), wd 0.05 with no decay on 1-D
params, pos_embed and cls_token; layer-wise lr decay (scale = decay^(L+1-id): 0 for the embeddings, i+1 for
block i, L+1 for the final norm and head); per-step linear warmup from 0 then cosine to min_lr; timm's
RandAugment "rand-m9-mstd0.5-inc1" + bicubic RandomResizedCrop + flip, random erasing 0.25, Mixup 0.8 /
CutMix 1.0 (switch 0.5, per batch) with label smoothing 0.1 folded into soft-target cross-entropy; eval
Resize(size x 256/224, bicubic) + CenterCrop. Not reproduced: DeepSpeed's fp16 loss scaling (we run fp32 on CPU,
bf16 autocast on GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from slip_core import augment, checkpoint, config as cfg_util, locks, procs, storage
from slip_core.distributed import DEVICE_PATTERN, init_from_env, local_device
from slip_core.train_state import TrainState, save_train_checkpoint


@dataclass
class FinetuneConfig:
    dataset: str = "imagenet"
    data_root: str | None = None
    epochs: int = 100
    warmup_epochs: int = 20
    batch_size: int = 128  # per rank
    lr: float = 4e-3  # absolute peak lr, no batch scaling (reference)
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.0
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_switch_prob: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float | None = 0.4  # timm applies it only without RandAugment (the tiny preset)
    image_size: int | None = None  # None: the pretrained model's (position embeddings resampled otherwise)
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    num_workers: int = 8
    save_every: int = 5
    stop_after_epochs: int | None = None  # stop early (as if interrupted) -- used to test resume
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu | cpu | cuda | cuda:N
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU | bf16 | fp32

    def __post_init__(self):
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"FinetuneConfig.device must be auto|cpu|cuda|cuda:N, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"FinetuneConfig.precision must be auto|bf16|fp32, got {self.precision!r}")


FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    "vits16": FinetuneConfig(drop_path=0.0, layer_decay=0.65),
    "vitb16": FinetuneConfig(drop_path=0.1, layer_decay=0.65),
    "vitl16": FinetuneConfig(epochs=50, warmup_epochs=5, drop_path=0.1, layer_decay=0.75),
    # CPU demo: a few epochs on a small local set; heavy regularisation (mixup/cutmix/RandAugment) is
    # turned down because it needs many epochs to pay off. Same code path otherwise.
    "tiny": FinetuneConfig(dataset="digits", epochs=20, warmup_epochs=1, batch_size=64, lr=2e-3, layer_decay=0.75,
                           mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0, smoothing=0.1, image_size=32,
                           crop_scale=(0.5, 1.0), hflip=0.0,
                           num_workers=0, save_every=1),
}


def preset_for(model_name: str) -> str:
    for key in ("VITS16", "VITB16", "VITL16"):
        if key in model_name:
            return key.lower()
    return "tiny"


# ------------------------------------------------------------------------------------------ model
def build_classifier(state: dict, num_classes: int, image_size: int | None, drop_path: float) -> nn.Module:
    """timm ViT with the checkpoint's vision weights (ours or released-SLIP `module.visual.*`)."""
    import timm.models.vision_transformer as tv
    from timm.layers import resample_abs_pos_embed

    mcfg = checkpoint.config_from_state(state)
    size = image_size or mcfg.image_size
    vit = tv.VisionTransformer(img_size=size, patch_size=mcfg.patch_size, embed_dim=mcfg.vision_width,
                               depth=mcfg.vision_depth, num_heads=mcfg.vision_heads, mlp_ratio=4.0, qkv_bias=True,
                               num_classes=num_classes, global_pool="token", drop_path_rate=drop_path)
    sd = checkpoint.strip_prefix(state["state_dict"])
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.") and not k.startswith("visual.head")}
    if not visual:
        raise checkpoint.CheckpointError("checkpoint has no visual.* weights")
    if visual["pos_embed"].shape != vit.pos_embed.shape:
        grid = size // mcfg.patch_size
        visual["pos_embed"] = resample_abs_pos_embed(visual["pos_embed"], (grid, grid), num_prefix_tokens=1)
    missing, unexpected = vit.load_state_dict(visual, strict=False)
    if set(missing) != {"head.weight", "head.bias"} or unexpected:
        raise checkpoint.CheckpointError(f"vision weights do not fit: missing {missing}, unexpected {unexpected}")
    nn.init.trunc_normal_(vit.head.weight, std=0.02)
    with torch.no_grad():
        vit.head.weight.mul_(0.001)  # BEiT init_scale
    nn.init.zeros_(vit.head.bias)
    return vit


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer ids: 0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over groups of (layer id, decay or not); each group carries lr_scale = decay^(depth + 1 - id)."""
    depth, skip = len(model.blocks), set(model.no_weight_decay())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, decay = layer_id(name, depth), not (p.ndim <= 1 or name in skip)
        g = groups.setdefault((lid, decay), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                             "lr_scale": cfg.layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return torch.optim.AdamW([groups[k] for k in sorted(groups)], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, total: int, warmup: int, cfg: FinetuneConfig) -> float:
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ------------------------------------------------------------------------------------------ data
def _posterize_compat(img, bits_to_keep, **_):
    """timm's 'inc1' RandAugment asks for 0 bits at top magnitude; Pillow >= 11 rejects that, while the
    Pillow of the reference gave the all-zero image -- which is what we return."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def transforms(size: int, cfg: FinetuneConfig):
    import timm.data.auto_augment as aa
    from timm.data import create_transform

    for name, fn in list(aa.NAME_TO_OP.items()):
        if fn is aa.posterize:
            aa.NAME_TO_OP[name] = _posterize_compat

    train = create_transform(size, is_training=True, auto_augment=cfg.auto_augment, re_prob=cfg.reprob,
                             scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                             re_mode="pixel", re_count=1, interpolation="bicubic", color_jitter=cfg.color_jitter or None,
                             mean=augment.MEAN, std=augment.STD)
    test = create_transform(size, is_training=False, interpolation="bicubic", crop_pct=224 / 256,
                            mean=augment.MEAN, std=augment.STD)
    return train, test


def _rank() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# ------------------------------------------------------------------------------------------ training
_RUNTIME_ONLY = ("stop_after_epochs", "threads", "num_workers", "device")  # may differ between a run and its resume


def _identity(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in _RUNTIME_ONLY}


def _resume(state: TrainState, ckpt_path: str, cfg: FinetuneConfig, rank: int, world: int, log) -> int:
    """Load `ckpt_path` into `state` when it exists; returns the epoch to start from."""
    if not storage.exists(ckpt_path):
        return 0
    saved = checkpoint.load_state(ckpt_path)
    if saved.get("task") != "finetune" or "train_state" not in saved:
        raise ValueError(f"{ckpt_path} is not a fine-tune checkpoint of this version; use a new --out")
    if _identity(saved["train_config"]) != _identity(cfg_util.to_dict(cfg)):
        raise ValueError(f"{ckpt_path} was written with a different fine-tune config; use a new --out")
    state.load_state_dict(saved["train_state"], model_state=saved["state_dict"], rank=rank, world=world,
                          rng_seed=cfg.seed + rank + 7919 * int(saved["train_state"]["step"]))
    log(f"resumed from {ckpt_path} at epoch {state.loader['epoch']}")
    return int(state.loader["epoch"])


def _train_epoch(ddp, loader, state: TrainState, mixup, criterion, autocast, device, lr_of) -> float:
    ddp.train()
    loss_sum = 0.0
    for images, y in loader:
        lr = lr_of(state.step)
        for g in state.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        images = images.to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        if mixup is not None:
            images, y = mixup(images, y)
        with autocast():
            loss = criterion(ddp(images), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite fine-tune loss at step {state.step}")
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.step, loss_sum = state.step + 1, loss_sum + loss.item()
    mean = torch.tensor([loss_sum / len(loader)], dtype=torch.float64)
    if dist.is_initialized():  # the epoch's loss over the global batches, not rank 0's half
        mean = mean.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return float(mean.item())


def _evaluate(model, test, device) -> dict:
    """The test metric, with the test set split across ranks (slip_core.features.extract gathers on rank 0),
    then shared with every rank so all keep the same history."""
    from evaluation import metrics
    from slip_core.features import extract

    model.eval()
    logits, labels = extract(model, test.dataset, batch_size=256, device=device)
    row = None if logits is None else {"num_samples": int(len(labels)),
                                       **metrics.compute(test.entry.metric, logits, labels)}
    if dist.is_initialized():
        box = [row]
        dist.broadcast_object_list(box, src=0)
        row = box[0]
    return row


def run(pretrained: str, out_dir: str, cfg: FinetuneConfig, log=print) -> dict:
    """One rank's fine-tune (call under torchrun for DDP, or directly for one process)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from datasets import catalog

    rank, world = _rank()
    device = local_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pre = checkpoint.load_state(pretrained)
    backbone = checkpoint.config_from_state(pre)
    size = cfg.image_size or backbone.image_size
    train_tf, test_tf = transforms(size, cfg)
    train = catalog.load(cfg.dataset, "train", train_tf, cfg.data_root, cfg.max_train_samples, cfg.seed)
    test = catalog.load(cfg.dataset, "test", test_tf, cfg.data_root, cfg.max_test_samples, cfg.seed)
    model = build_classifier(pre, train.entry.num_classes, size, cfg.drop_path).to(device)
    del pre
    bf16 = (cfg.precision == "bf16") or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    state = TrainState(model, build_optimizer(model, cfg), torch.amp.GradScaler(device.type, enabled=False))
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    sampler = torch.utils.data.DistributedSampler(train.dataset, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train.dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                         pin_memory=device.type == "cuda")
    mixup_on = cfg.mixup > 0 or cfg.cutmix > 0
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=cfg.mixup_switch_prob,
                  mode="batch", label_smoothing=cfg.smoothing, num_classes=train.entry.num_classes) if mixup_on else None
    criterion = SoftTargetCrossEntropy() if mixup_on else (
        LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss())
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.dataset}: fewer training samples than one batch of {cfg.batch_size} x {world} ranks")
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    ckpt_path = storage.join(out_dir, "checkpoint.pt")
    start_epoch = _resume(state, ckpt_path, cfg, rank, world, log)
    history = state.extra.setdefault("history", [])
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after_epochs is not None and epoch >= cfg.stop_after_epochs:
            log(f"stopping after {epoch} epochs (stop_after_epochs)")
            return {"stopped_at_epoch": epoch}
        sampler.set_epoch(epoch)
        t0 = time.time()
        loss = _train_epoch(ddp, loader, state, mixup, criterion, autocast, device,
                            lambda step: lr_at(step, total, warmup, cfg))
        locks.ensure_writer(out_dir)  # folder removed or taken over meanwhile: stop before writing into it
        row = {"epoch": epoch + 1, "step": state.step, "lr": lr_at(state.step - 1, total, warmup, cfg), "loss": loss,
               "epoch_s": round(time.time() - t0, 2), **_evaluate(model, test, device)}
        history.append(row)
        state.loader = {"epoch": epoch + 1}
        if rank == 0:
            log(json.dumps(row))
            with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:  # collective: every rank's RNG
            save_train_checkpoint(ckpt_path, state, backbone, cfg_util.to_dict(cfg), main=rank == 0,
                                  task="finetune", num_classes=train.entry.num_classes)
    final = history[-1]
    result = {"metric": test.entry.metric, "value": final["value"], "top1": final["top1"],
              "best_value": max(h["value"] for h in history), "epochs": cfg.epochs, "num_samples": final["num_samples"],
              "chance": test.entry.chance(), "image_size": size, "world_size": world, "device": device.type,
              "precision": "bf16" if bf16 else "fp32",
              "recipe": "BEiT fine-tune (layer decay, drop path, mixup/cutmix, label smoothing, warmup+cosine)"}
    if rank == 0:
        storage.atomic_write_text(storage.join(out_dir, "result.json"), json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------ launching
def launch(pretrained: str, out_dir: str, cfg: FinetuneConfig, nproc: int = 1, timeout_s: float | None = None,
           log=print, launcher: dict | None = None) -> dict:
    """Run the fine-tune's ranks through `launcher` (slip_core/launchers.py; default: torchrun here, a
    subprocess killed on timeout); returns result.json. The out_dir must be reachable from where the ranks run."""
    from datasets import catalog
    from slip_core import launchers
    from slip_core.launch import default_threads

    catalog.ensure(cfg.dataset, cfg.data_root)  # materialise local sets once, before the ranks start
    os.makedirs(out_dir, exist_ok=True)
    cfg = dataclasses.replace(cfg, threads=cfg.threads or default_threads(nproc, cfg.num_workers))
    args = ("--pretrained", pretrained, "--out", out_dir, "--config-json", json.dumps(cfg_util.to_dict(cfg)))
    job = launchers.TrainerJob("evaluation.finetune", args, log_dir=out_dir, nproc=nproc, name="slip-finetune",
                               env={"OMP_NUM_THREADS": str(cfg.threads)})
    launchers.launch(job, launcher, timeout_s, log)
    result_path = os.path.join(out_dir, "result.json")
    if not os.path.exists(result_path):
        return {"stopped": True}
    with open(result_path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="BEiT-style fine-tune of a pretrained SLIP/CLIP/SimCLR ViT (one rank)")
    p.add_argument("--pretrained", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config-json", default="{}")
    args = p.parse_args(argv)
    procs.follow_parent(graceful=False)  # torchrun gone: nothing to save mid-epoch, stop at once
    cfg = cfg_util.from_dict(FinetuneConfig, json.loads(args.config_json))
    init_from_env(local_device(cfg.device))  # NCCL for a CUDA device, gloo on the CPU
    try:
        with locks.rank0_writer(args.out, purpose="fine-tune"):  # one writer per fine-tune folder
            run(args.pretrained, args.out, cfg)
    except (locks.LockBusy, locks.LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
