"""SLIP / CLIP / SimCLR pretraining (SPEC §6): one loop for a laptop CPU and for many GPUs under torchrun.

    python -m torch.distributed.run --nproc_per_node=8 -m slip_core.trainer \
        --dataset STORE/dataset/.../manifest.json --out RUN_DIR --preset slip_vitb16_yfcc15m_25ep

Exact resume is a design constraint, not an afterthought: the data stream is a pure function of
(seed, epoch, rank, worker, position) (slip_core.data), checkpoints are taken on optimizer-step
boundaries and hold model, optimizer, GradScaler, step, every RNG state of every rank and every rank's
loader position, and the lr schedule is a function of the step. Killing the process at any point and
resuming from `checkpoints/latest` therefore reproduces an uninterrupted run bit for bit (CPU, same world
size). metrics.jsonl is truncated back to the checkpoint's step on resume, so it never has gaps or
duplicates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from slip_core import checkpoint as ckpt
from slip_core import config as cfgmod
from slip_core import storage
from slip_core.augment import VIEWS_BY_KIND, AugmentConfig, normalize_uint8_batch
from slip_core.data import EpochLoader, LoaderConfig, dataset_num_samples, shard_urls
from slip_core.losses import build_loss
from slip_core.models import build_model, get_config
from slip_core.train_log import MetricsLog, Trackers
from slip_core.optim import LOGIT_SCALE_MAX, REFERENCE_HPARAMS, build_optimizer, lr_at, set_lr


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(RuntimeError):
    """Stopped by SIGTERM/SIGUSR1 after checkpointing; the CLI exits 143 so launchers retry/requeue."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = "SLIP_VIT_TINY"
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields, e.g. {"ssl_mlp_dim": 2048}
    epochs: int = 25
    samples_per_epoch: int = 0  # 0: the dataset's num_samples
    batch_size: int = 64  # per device, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (SLIP's update_freq)
    global_batch: int = 0  # >0: derive accum_steps = global_batch / (batch_size × world)
    max_steps: int = 0  # >0: stop early at this step (the schedule still spans all epochs)
    lr: float = 0.0  # 0: the reference lr for the model kind (SPEC §6)
    weight_decay: float = -1.0  # <0: the reference wd for the model kind
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
    shuffle_chunk: int = 1000
    resampled: bool = True
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

    def __post_init__(self):
        # Checked here, not at step 1 of a queued cluster job: a bad value fails when the config is built.
        from slip_core.models import MODEL_PRESETS

        problems = []
        if self.model not in MODEL_PRESETS:
            problems.append(f"model {self.model!r} is not a preset ({', '.join(sorted(MODEL_PRESETS))})")
        for name in ("epochs", "batch_size", "accum_steps", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("samples_per_epoch", "global_batch", "max_steps", "num_workers", "threads", "eps",
                     "warmup_epochs", "start_lr", "end_lr", "ssl_scale"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ssl_temp <= 0:
            problems.append(f"ssl_temp must be > 0, got {self.ssl_temp}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            problems.append(f"precision must be auto|bf16|fp16|fp32, got {self.precision!r}")
        if self.caption_mode not in ("strict", "reference"):
            problems.append(f"caption_mode must be strict|reference, got {self.caption_mode!r}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))


_PAPER = dict(epochs=25, batch_size=64, global_batch=4096, num_workers=10, log_every=10, ckpt_every=1000)
_TINY = dict(epochs=2, batch_size=32, lr=2e-3, weight_decay=0.1, warmup_epochs=0.25, num_workers=1,
             log_every=5, ckpt_every=50, shuffle_chunk=500)
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # `make demo`: ~3k 64-px Fashion-MNIST + 20 photos, 2 epochs ≈ 180 steps of 32, one torch thread + one
    # loader worker on 2 cores: 243 s on a shared box. Zero-shot on 2000 held-out Fashion-MNIST test images
    # ("a photo of a {c}." prompts, chance 10 %): 41.0 % with the demo corpus's caption mix, 49.7 % with
    # plain "a photo of a {c}" captions; lr 3e-3 gave 40.2 %.
    "tiny": TrainConfig(model="SLIP_VIT_TINY", **_TINY),
    "clip_tiny": TrainConfig(model="CLIP_VIT_TINY", **_TINY),
    "simclr_tiny": TrainConfig(model="SIMCLR_VIT_TINY", **_TINY),
    # Other SSL objectives inside SLIP (paper Table 6) and CLIP's ResNet (slip_core/ssl_variants.py, resnet_clip.py).
    **{f"{v.lower()}_tiny": TrainConfig(model=f"SLIP_{v}_VIT_TINY", **_TINY) for v in ("MOCOV3", "BYOL", "BEIT")},
    "clip_rn_tiny": TrainConfig(model="CLIP_RN_TINY", **_TINY),
}
# Paper recipes (SPEC §6): 64 per device, global 4096 (accumulation fills the gap on fewer devices),
# reference lr/wd per kind (resolve()), YFCC15M 25/50/100 epochs, CC3M 40, CC12M 35.
for _kind in ("slip", "clip", "simclr"):
    for _vit in ("vits16", "vitb16", "vitl16"):
        for _data, _ep in (("yfcc15m", 25), ("yfcc15m", 50), ("yfcc15m", 100), ("cc3m", 40), ("cc12m", 35)):
            TRAIN_PRESETS[f"{_kind}_{_vit}_{_data}_{_ep}ep"] = TrainConfig(
                model=f"{_kind.upper()}_{_vit.upper()}", **{**_PAPER, "epochs": _ep})


# ---------------------------------------------------------------------------------------------- setup
def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the 'reference default' sentinels (lr, wd) from the model kind."""
    kind = get_config(cfg.model, **cfg.model_overrides).kind
    lr, wd = REFERENCE_HPARAMS.get(kind, REFERENCE_HPARAMS["slip"])  # SLIP variants: SLIP's recipe
    return replace(cfg, lr=cfg.lr or lr, weight_decay=wd if cfg.weight_decay < 0 else cfg.weight_decay)


def steps_per_epoch(samples: int, world: int, batch_size: int, accum: int) -> int:
    """Reference accounting (SPEC §9.7): per-rank ceil(N / world) samples, drop_last batches, then steps."""
    return (math.ceil(samples / world) // batch_size) // accum


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_object(obj):
    """Every rank's `obj` as a list indexed by rank (a one-element list without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


class StopRequest:
    """SIGTERM / SIGUSR1 (torchrun forwarding a kill, SLURM pre-emption warning) -> checkpoint at the next
    step boundary and exit 143, instead of losing up to ckpt_every steps. Ranks agree via an all-reduce."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self.previous = False, {}
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self, device: torch.device) -> bool:
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------- step
def forward_inputs(kind: str, batch: dict, device: torch.device) -> tuple:
    def get(k):
        x = batch[k].to(device, non_blocking=True)
        return normalize_uint8_batch(x) if x.dtype == torch.uint8 else x
    if kind == "clip":
        return get("image"), get("text")
    if kind == "simclr":
        return get("aug1"), get("aug2")
    return get("image"), get("text"), get("aug1"), get("aug2")


def train_step(model, loss_fn, optimizer, scaler, micro_batches: list[dict], *, kind: str,
               device: torch.device, autocast, lr: float, progress: float = 0.0) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the mean loss dict.

    Isolated so it can be profiled and benchmarked on its own (bench/train_step.py)."""
    set_lr(optimizer, lr)
    n = len(micro_batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        # DDP: all-reduce gradients only on the last micro-batch (same sum, fewer syncs).
        sync = contextlib.nullcontext() if (i == n - 1 or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with autocast():
                out = loss_fn(model(*forward_inputs(kind, batch, device)))
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {loss.item()} (SPEC §6: stop on non-finite loss)")
            scaler.scale(loss / n).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    m = unwrap(model)
    if hasattr(m, "logit_scale"):
        with torch.no_grad():
            m.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    if hasattr(m, "after_optimizer_step"):  # EMA targets of the SLIP variants (slip_core/ssl_variants.py)
        m.after_optimizer_step(progress)
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- io
def latest_checkpoint(out_dir: str) -> str | None:
    pointer = storage.join(out_dir, "checkpoints", "latest")
    if not storage.exists(pointer):
        return None
    return storage.join(out_dir, "checkpoints", storage.read_text(pointer).strip())


def save_resume_checkpoint(out_dir: str, model, extra: dict, step: int, keep: int) -> str:
    """Write checkpoints/step_N.pt atomically, then flip the `latest` pointer atomically, then prune."""
    name = f"step_{step:08d}.pt"
    url = storage.join(out_dir, "checkpoints", name)
    ckpt.save_checkpoint(url, model, **extra)
    storage.atomic_write_text(storage.join(out_dir, "checkpoints", "latest"), name)
    fs, path = storage.url_to_fs(storage.join(out_dir, "checkpoints"))
    old = sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("step_"))
    for p in old[:-keep] if keep > 0 else []:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p)
    return url


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, dataset_manifest: str, out_dir: str, resume: str | None = "latest") -> dict:
    """Train on a dataset artifact; write checkpoints/, metrics.jsonl, checkpoint.pt and final_metrics.json
    under `out_dir`; return the final metrics (rank 0's view, losses averaged over ranks)."""
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = rank == 0
    mcfg = get_config(cfg.model, **cfg.model_overrides)
    accum = cfg.accum_steps
    if cfg.global_batch:
        accum = max(1, cfg.global_batch // (cfg.batch_size * world))
        if accum * cfg.batch_size * world != cfg.global_batch:
            raise ValueError(f"global_batch {cfg.global_batch} is not batch_size × world × k")
    urls = shard_urls(dataset_manifest)
    samples = cfg.samples_per_epoch or dataset_num_samples(dataset_manifest)
    spe = steps_per_epoch(samples, world, cfg.batch_size, accum)
    if spe < 1:
        raise ValueError(f"{samples} samples/epoch is less than one step of {cfg.batch_size}×{world}×{accum}")
    total_steps = cfg.epochs * spe
    warmup_steps = int(round(cfg.warmup_epochs * spe))
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # Seed = seed + rank (SPEC §6); model init uses rank 0's stream and DDP broadcasts it anyway.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **cfg.model_overrides).to(device)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    if cfg.grad_checkpointing:
        if not hasattr(model.visual, "set_grad_checkpointing"):
            raise ValueError(f"{cfg.model}: its image tower does not support gradient checkpointing")
        model.visual.set_grad_checkpointing(True)
    loss_fn = build_loss(mcfg.kind, ssl_scale=cfg.ssl_scale, ssl_temp=cfg.ssl_temp,
                         clip_gather_with_grad=cfg.clip_gather_with_grad)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    step, loader_state = 0, None
    resume_url = latest_checkpoint(out_dir) if resume == "latest" else resume
    if resume_url:
        state = ckpt.load_state(resume_url)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        set_rng_state(state["rng"][str(rank)])
        loader_state = state["loader"][str(rank)]
        if main:
            print(f"resumed from {resume_url} at step {step}", flush=True)
    metrics_log = MetricsLog(storage.join(out_dir, "metrics.jsonl"), main, step if resume_url else None)
    trackers = Trackers(cfg, out_dir, main)

    fwd_model = model
    if world > 1:
        fwd_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    model.train()

    lcfg = LoaderConfig(batch_size=cfg.batch_size, views=VIEWS_BY_KIND[mcfg.kind],
                        aug=AugmentConfig(image_size=mcfg.image_size, max_pixels=cfg.max_pixels, draft=cfg.draft),
                        seed=cfg.seed, caption_mode=cfg.caption_mode, context_length=mcfg.context_length,
                        force_eot=cfg.force_eot, num_workers=cfg.num_workers, shuffle_chunk=cfg.shuffle_chunk,
                        resampled=cfg.resampled)
    global_batch = cfg.batch_size * world * accum
    if main:
        print(f"training {cfg.model}: {spe} steps/epoch × {cfg.epochs} epochs = {total_steps} steps "
              f"(stop at {stop_step}), global batch {global_batch} = {cfg.batch_size}×{world}×{accum}, "
              f"{precision}, {device}", flush=True)

    t_start, window, last, preempted = time.time(), [], {}, False
    stop = StopRequest()
    try:
        while step < stop_step and not preempted:
            epoch = step // spe
            loader = EpochLoader(urls, lcfg, epoch=epoch, num_batches=spe * accum, rank=rank,
                                 world=world, state=loader_state)
            it = iter(loader)
            while step < min(stop_step, (epoch + 1) * spe):
                t0 = time.time()
                micro = [next(it) for _ in range(accum)]
                t1 = time.time()
                out = train_step(fwd_model, loss_fn, optimizer, scaler, micro, kind=mcfg.kind, device=device,
                                 autocast=autocast, progress=(step + 1) / total_steps,
                                 lr=lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.start_lr, cfg.end_lr))
                step += 1
                t2 = time.time()
                window.append((t1 - t0, t2 - t0))
                if step % cfg.log_every == 0 or step == stop_step:
                    rec = _metrics_record(out, step, epoch, optimizer, model, loader, window, global_batch, device)
                    metrics_log.write(rec)
                    trackers.log(rec)
                    last, window = rec, []
                    if main:
                        print(json.dumps(rec), flush=True)
                preempted = stop.should_stop(device)
                if step % cfg.ckpt_every == 0 or step == stop_step or preempted:
                    metrics_log.flush()  # object stores: records up to this step are durable with the checkpoint
                    _checkpoint(out_dir, cfg, model, optimizer, scaler, step, loader, main)
                if preempted:
                    if main:
                        print(f"stop requested by signal: checkpointed step {step}, exiting", flush=True)
                    break
            it.close()
            loader_state = None
    finally:
        stop.restore()
    if preempted:
        metrics_log.close()
        trackers.close()
        raise Preempted(f"stopped by signal at step {step} (resume with --resume latest)")
    if not last and main and storage.exists(metrics_log.path):  # resumed an already finished run
        lines = storage.read_text(metrics_log.path).splitlines()
        last = json.loads(lines[-1]) if lines else {}

    final = {**{k: v for k, v in last.items() if k not in ("samples_per_s", "data_time", "step_time")},
             "steps": step, "total_steps": total_steps, "world_size": world, "global_batch": global_batch,
             "train_time_s": round(time.time() - t_start, 2), "model": cfg.model}
    if main:
        ckpt.save_checkpoint(storage.join(out_dir, "checkpoint.pt"), model, step=step,
                             train_config=cfgmod.to_dict(cfg), metrics=final)
        storage.atomic_write_text(storage.join(out_dir, "final_metrics.json"), json.dumps(final, indent=2))
    metrics_log.close()
    trackers.close()
    if dist.is_initialized():
        dist.barrier()
    return final


def _metrics_record(out, step, epoch, optimizer, model, loader, window, global_batch, device) -> dict:
    keys = ("loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc")
    vals = torch.tensor([out.get(k, float("nan")) for k in keys], dtype=torch.float64)
    counts = loader.counts()
    cvec = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.float64)
    if dist.is_initialized():  # mean losses/accuracies, summed skip counters, over ranks
        both = torch.cat([vals, cvec]).to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(both)
        both = both.cpu()
        vals, cvec = both[:5] / dist.get_world_size(), both[5:]
    data_t = sum(w[0] for w in window) / len(window)
    step_t = sum(w[1] for w in window) / len(window)
    rec = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
           "samples_per_s": round(global_batch / step_t, 2), "data_time": round(data_t, 4),
           "step_time": round(step_t, 4)}
    for k, v in zip(keys, vals.tolist()):
        if not math.isnan(v):
            rec[k] = v
    m = unwrap(model)
    if hasattr(m, "logit_scale"):
        rec["logit_scale"] = float(m.logit_scale.detach().exp())
    rec["skipped"] = {k: int(v) for k, v in zip(sorted(counts), cvec.tolist()) if k != "ok"}
    return rec


def _checkpoint(out_dir, cfg, model, optimizer, scaler, step, loader, main) -> None:
    rngs = gather_object(rng_state())
    loaders = gather_object(loader.state_dict())
    if main:
        save_resume_checkpoint(out_dir, model, {
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "train_config": cfgmod.to_dict(cfg),
            "rng": {str(r): s for r, s in enumerate(rngs)}, "loader": {str(r): s for r, s in enumerate(loaders)},
        }, step, cfg.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- CLI
def config_from_args(preset: str, config_json: str | None, sets: list[str]) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose from {sorted(TRAIN_PRESETS)}")
    cfg = TRAIN_PRESETS[preset]
    if config_json:
        cfg = cfgmod.from_dict(TrainConfig, {**cfgmod.to_dict(cfg), **json.loads(storage.read_text(config_json))})
    return cfgmod.override(cfg, cfgmod.parse_sets(sets)) if sets else cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slip_core.trainer", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="dataset manifest URL")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config-json", default=None, help="JSON file of TrainConfig fields (over the preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default="latest", help="'latest', a checkpoint path, or 'none'")
    args = p.parse_args(argv)
    cfg = config_from_args(args.preset, args.config_json, args.sets)
    try:
        train(cfg, args.dataset, args.out, resume=None if args.resume == "none" else args.resume)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return 143
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
