"""Pretraining configuration: TrainConfig, its presets, the reference defaults per kind, and the batch plan.

The batch plan turns (global batch asked for, world size, per-device memory budget) into micro-batch ×
ranks × accumulation steps and the number of data streams (slip_core/data.py). It is made once when a run
starts and kept in the checkpoint, so a resume at another world size keeps the global batch (through gradient
accumulation) and the data position (streams are redistributed over the new ranks).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from slip_core.augment import AugmentConfig
from slip_core.distributed import DEVICE_PATTERN
from slip_core.registry import MODEL_PRESETS, get_config, get_spec


@dataclass(frozen=True)
class TrainConfig:
    model: str = "SLIP_VIT_TINY"
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {"ssl_mlp_dim": 2048}
    epochs: int = 25
    samples_per_epoch: int = 0  # 0: the dataset's num_samples (a full pass)
    batch_size: int = 64  # per device, per micro-batch: the memory budget (a plan may use less)
    accum_steps: int = 1  # micro-batches per optimizer step (SLIP's update_freq) when global_batch is 0
    global_batch: int = 0  # >0: the global batch; micro-batch × accumulation chosen per world size (BatchPlan)
    max_steps: int = 0  # >0: stop early at this step (the schedule still spans all epochs)
    lr: float = 0.0  # 0: the reference lr of the model kind (its TrainSpec, SPEC §6)
    weight_decay: float = -1.0  # <0: the reference wd of the model kind
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_epochs: float = 1.0
    start_lr: float = 1e-6
    end_lr: float = 1e-5
    ssl_scale: float = 1.0
    ssl_temp: float = 0.1
    clip_gather_with_grad: bool = False  # SPEC §9.3 option; default = reference (no grad through gather)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (GradScaler) | fp32
    grad_checkpointing: bool = False  # ViT blocks (timm); the text tower is cheap next to 3 image passes
    compile: bool = False
    caption_mode: str = "strict"  # strict: skip empty title/description; reference: SLIP's 50/50
    force_eot: bool = False
    num_workers: int = 2
    shuffle_chunk: int = 1000  # shuffle buffer: samples permuted together, per data stream
    shuffle_shards: int = 4  # shards read interleaved into each stream's shuffle buffer (cross-shard mixing)
    resampled: bool = False  # False: full passes (each sample once per epoch); True: shards with replacement
    data_streams: int = 0  # 0: auto (BatchPlan); the data position's unit of elasticity
    record_samples: bool = False  # write samples.jsonl: the sample keys of every step (audits, elastic tests)
    draft: bool = True
    max_pixels: int = AugmentConfig.max_pixels
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # optimizer steps between resume checkpoints (and one at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = False
    wandb: bool = False
    device: str = "auto"
    threads: int = 0  # >0: torch.set_num_threads
    # In-training evaluation (evaluation/in_training.py, injected by `python -m evaluation.train_entry`): zero-shot
    # top-1 on a held-out set (k-NN top-1 for models without a text tower) every `eval_every_steps` optimizer
    # steps when > 0, else every `eval_every_epochs` epochs (0 and 0: off), and at the last step; the best
    # value keeps checkpoint_best.pt (the reference's eval_freq / checkpoint_best rule, SPEC §6).
    eval_every_epochs: float = 1.0
    eval_every_steps: int = 0
    eval_dataset: str = "auto"  # a datasets.catalog name; auto: imagenet when on disk, else the first set found
    eval_data_root: str = ""  # "": the catalog's default ($SLIP_EVAL_DATA or .data/eval)
    eval_max_samples: int = 0  # >0: a reproducible subsample of the held-out split
    eval_knn_train_samples: int = 10000  # k-NN bank (train split) for models without a text tower
    eval_batch_size: int = 256

    def __post_init__(self):
        # Checked here, not at step 1 of a queued cluster job: a bad value fails when the config is built.
        problems = []
        if self.model not in MODEL_PRESETS:
            problems.append(f"model {self.model!r} is not a preset ({', '.join(sorted(MODEL_PRESETS))})")
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "ckpt_every", "keep_checkpoints",
                     "shuffle_chunk", "shuffle_shards", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("samples_per_epoch", "global_batch", "max_steps", "num_workers", "threads", "eps",
                     "warmup_epochs", "start_lr", "end_lr", "ssl_scale", "data_streams", "eval_every_epochs",
                     "eval_every_steps", "eval_max_samples", "eval_knn_train_samples"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ssl_temp <= 0:
            problems.append(f"ssl_temp must be > 0, got {self.ssl_temp}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"precision must be auto|bf16|fp16|fp32, got {self.precision!r}")
        if self.caption_mode not in ("strict", "reference"):
            problems.append(f"caption_mode must be strict|reference, got {self.caption_mode!r}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            problems.append(f"device must be auto|cpu|cuda|cuda:N, got {self.device!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))


# Paper recipes (SPEC §6): 64 per device, global 4096 (accumulation fills the gap on fewer devices), full
# passes over the dataset per epoch (the reference's DistributedSampler), reference lr/wd per kind (resolve()),
# zero-shot evaluation every epoch (the reference's eval_freq=1) on the whole held-out split.
_PAPER = dict(epochs=25, batch_size=64, global_batch=4096, num_workers=10, log_every=10, ckpt_every=1000)
# The tiny presets also train full passes: with streams cut at sample granularity (slip_core/data.py) a
# 3-shard demo corpus splits over any world size, and every demo sample is seen once per epoch as in the
# paper, instead of ~63 % of the shards under resampling.
# In-training evaluation: every half epoch (4 points over the 2 epochs), on 500 held-out images (k-NN bank: 1000).
_TINY = dict(epochs=2, batch_size=32, lr=2e-3, weight_decay=0.1, warmup_epochs=0.25, num_workers=1,
             log_every=5, ckpt_every=50, shuffle_chunk=500, eval_every_epochs=0.5, eval_max_samples=500,
             eval_knn_train_samples=1000)
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # `make demo`: ~3k 64-px Fashion-MNIST + 20 photos, 2 epochs ≈ 180 steps of 32, one torch thread + one
    # loader worker on 2 cores.
    "tiny": TrainConfig(model="SLIP_VIT_TINY", **_TINY),
    "clip_tiny": TrainConfig(model="CLIP_VIT_TINY", **_TINY),
    "simclr_tiny": TrainConfig(model="SIMCLR_VIT_TINY", **_TINY),
    # Other SSL objectives inside SLIP (paper Table 6) and CLIP's ResNet (slip_core/ssl_variants.py, resnet_clip.py).
    **{f"{v.lower()}_tiny": TrainConfig(model=f"SLIP_{v}_VIT_TINY", **_TINY) for v in ("MOCOV3", "BYOL", "BEIT")},
    "clip_rn_tiny": TrainConfig(model="CLIP_RN_TINY", **_TINY),
}
for _kind in ("slip", "clip", "simclr"):
    for _vit in ("vits16", "vitb16", "vitl16"):
        for _data, _ep in (("yfcc15m", 25), ("yfcc15m", 50), ("yfcc15m", 100), ("cc3m", 40), ("cc12m", 35)):
            TRAIN_PRESETS[f"{_kind}_{_vit}_{_data}_{_ep}ep"] = TrainConfig(
                model=f"{_kind.upper()}_{_vit.upper()}", **{**_PAPER, "epochs": _ep})


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the 'reference default' sentinels (lr, wd) from the model kind's TrainSpec."""
    spec = get_spec(get_config(cfg.model, **cfg.model_overrides))
    return replace(cfg, lr=cfg.lr or spec.lr,
                   weight_decay=spec.weight_decay if cfg.weight_decay < 0 else cfg.weight_decay)


# ---------------------------------------------------------------------------------------------- batch plan
class PlanError(ValueError):
    """The batch arithmetic cannot work for this world size (a one-line reason, with the sizes that can)."""


@dataclass(frozen=True)
class BatchPlan:
    requested: int  # the global batch the config (or the resumed checkpoint) asks for
    global_batch: int
    world: int
    micro: int  # samples per device per micro-batch
    accum: int  # micro-batches per optimizer step
    streams: int  # data streams (slip_core/data.py): world | streams | global_batch
    workers: int  # loader worker processes per rank (a divisor of streams per rank)

    @property
    def per_stream(self) -> int:
        """Samples each data stream contributes to every optimizer step."""
        return self.global_batch // self.streams

    @property
    def contrastive_batch(self) -> int:
        """Rows one CLIP/SimCLR loss normalises over (micro-batch gathered across ranks)."""
        return self.micro * self.world

    def elastic_world_sizes(self) -> list[int]:
        return [d for d in range(1, self.streams + 1) if self.streams % d == 0]

    def describe(self) -> str:
        why = "" if self.global_batch == self.requested else (
            f" ({self.requested} requested does not split evenly over {self.world} ranks)")
        sizes = self.elastic_world_sizes()
        return (f"global batch {self.global_batch} = {self.micro} per micro-batch × {self.world} ranks × "
                f"{self.accum} accumulation steps{why}; contrastive batch {self.contrastive_batch}; "
                f"{self.streams} data streams ({self.streams // self.world} per rank, {self.workers} loader "
                f"workers); resumable at world sizes {', '.join(map(str, sizes[:12]))}{' ...' if len(sizes) > 12 else ''}")


def split_micro(per_rank: int, max_micro: int) -> tuple[int, int]:
    """(micro, accum) with micro × accum = per_rank, micro <= max_micro, and the fewest accumulation steps."""
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max_micro)
    return per_rank // accum, accum


def _nearest_per_rank(requested: int, world: int, max_micro: int) -> int:
    """The per-rank batch b whose global batch b × world is nearest the request (smaller on a tie) and whose
    micro-batches stay at least half the memory budget (a prime b > max_micro would force micro-batches of 1)."""
    target = requested / world
    for d in range(0, requested):
        for b in sorted({math.floor(target) - d, math.ceil(target) + d}, key=lambda x: (abs(x - target), x)):
            if b >= 1 and (b <= max_micro or split_micro(b, max_micro)[0] >= (max_micro + 1) // 2):
                return b
    return 1


def plan_batch(requested: int, world: int, max_micro: int, num_workers: int = 0, streams: int = 0,
               exact: bool = False) -> BatchPlan:
    """Plan a run. `exact` (a resume): the global batch and `streams` are the checkpoint's and must be kept."""
    if requested < 1 or world < 1:
        raise PlanError(f"global batch {requested} and world size {world} must be >= 1")
    if exact and (requested % world or streams % world):
        sizes = ", ".join(str(d) for d in range(1, streams + 1) if streams % d == 0)
        raise PlanError(f"the checkpoint's global batch {requested} comes from {streams} data streams of "
                        f"{requested // streams} samples per step, which cannot be split evenly over {world} ranks: "
                        f"resume at world size {sizes}")
    per_rank = requested // world if requested % world == 0 else _nearest_per_rank(requested, world, max_micro)
    global_batch = per_rank * world
    if streams:
        if streams % world or global_batch % streams:
            raise PlanError(f"data_streams={streams} must be a multiple of the world size {world} and divide the "
                            f"global batch {global_batch}")
    else:  # as many streams as fit max(8, world × workers), each rank owning an equal share of the batch
        cap = max(8, world * max(1, num_workers))
        streams = world * max(m for m in range(1, per_rank + 1) if per_rank % m == 0 and world * m <= cap)
    per_rank_streams = streams // world
    workers = max([w for w in range(1, num_workers + 1) if per_rank_streams % w == 0], default=0)
    micro, accum = split_micro(per_rank, max_micro)
    return BatchPlan(requested, global_batch, world, micro, accum, streams, workers)


def epoch_steps(samples: int, plan: BatchPlan) -> int:
    """Optimizer steps per epoch: each of the S streams holds ⌊samples / S⌋ samples and gives G/S per step
    (drop_last). Paper: 14,689,580 samples, S = 512, G = 4096 → 3,586 (SPEC §9.7)."""
    return (samples // plan.streams) // plan.per_stream
