"""SLIP / CLIP / SimCLR pretraining (SPEC §6): one loop for a laptop CPU and for many GPUs under torchrun.

    python -m torch.distributed.run --nproc_per_node=8 -m slip_core.trainer \
        --dataset STORE/dataset/.../manifest.json --out RUN_DIR --preset slip_vitb16_yfcc15m_25ep

`train()` = build → resume_run → loop → finish. The model kind's TrainSpec (slip_core/registry.py) supplies model,
loss, loader views and forward inputs; `train_step` (isolated for profiling, bench/train_step.py) is one
optimizer step over the micro-batches of a step. Exact resume is a design constraint: the data stream is a
pure function of (seed, epoch, stream, position) (slip_core/data.py), checkpoints are taken on optimizer-step
boundaries and hold one TrainState (slip_core/train_state.py: model, optimizer, GradScaler, step, every rank's
RNG, the data position), and the lr schedule is a function of the step. Killing the process at any point
and resuming from `checkpoints/latest` reproduces an uninterrupted run bit for bit (CPU, same world size);
at another world size the global batch and the data position are kept (elastic resume). metrics.jsonl is
truncated back to the checkpoint's step on resume, so it never has gaps or duplicates.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from slip_core import config as cfgmod
from slip_core import locks, procs, progress, storage
from slip_core.augment import AugmentConfig, normalize_uint8_batch
from slip_core.checkpoint import load_state, unwrap
from slip_core.data import EpochLoader, LoaderConfig, StreamLayout, dataset_shards, merge_states
from slip_core.distributed import get_rank, get_world_size, init_from_env, local_device
from slip_core.losses import LossOptions
from slip_core.models import ModelConfig
from slip_core.optim import build_optimizer, lr_at, set_lr
from slip_core.preemption import EXIT_PREEMPTED, Preempted, StopRequest
from slip_core.registry import build_model_from_config, get_config, get_spec
from slip_core.train_config import (TRAIN_PRESETS, BatchPlan, PlanError, TrainConfig, epoch_steps, plan_batch,
                                    resolve)
from slip_core.train_log import MetricsLog, Trackers
from slip_core.train_spec import TrainSpec
from slip_core.train_state import (TrainState, best_checkpoint_url, gather_object, latest_checkpoint,
                                   prune_best_checkpoints, save_best_checkpoint, save_resume_checkpoint,
                                   save_train_checkpoint, seed_everything)

__all__ = ["TRAIN_PRESETS", "TrainConfig", "resolve", "train", "train_step", "main"]  # flows import these here


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- step
def forward_inputs(spec: TrainSpec, batch: dict, device: torch.device) -> list[torch.Tensor]:
    """The batch entries the kind's forward takes, on `device`; uint8 views are normalised there."""
    out = []
    for k in spec.inputs:
        x = batch[k].to(device, non_blocking=True)
        out.append(normalize_uint8_batch(x) if x.dtype == torch.uint8 else x)
    return out


def train_step(model, loss_fn, optimizer, scaler, micro_batches: list[dict], *, spec: TrainSpec,
               device: torch.device, autocast, lr: float, progress: float = 0.0) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation: each micro-batch's loss / k, one
    update); returns the mean loss dict. `progress` = position in the run after this step (EMA schedules)."""
    set_lr(optimizer, lr)
    n = len(micro_batches)
    sums: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        # DDP: all-reduce gradients only on the last micro-batch (same sum, fewer syncs).
        sync = contextlib.nullcontext() if (i == n - 1 or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with autocast():
                out = loss_fn(model(*forward_inputs(spec, batch, device)))
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {loss.item()} (SPEC §6: stop on non-finite loss)")
            scaler.scale(loss / n).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    spec.after_step(unwrap(model), progress)
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------- build
StepCallback = Callable[["TrainRun", dict], None]  # (run, this step's loss dict), after every optimizer step
CallbackFactory = Callable[[TrainConfig], list]  # an entry module's callbacks for a config (evaluation/train_entry.py)
BEST_FILE = "checkpoint_best.pt"  # next to checkpoint.pt when a callback offered a metric (TrainRun.offer_best)


@dataclass
class TrainRun:
    """Everything a training run is made of; `build` fills it, `loop` drives it."""
    cfg: TrainConfig
    out_dir: str
    spec: TrainSpec
    model_config: ModelConfig
    rank: int
    world: int
    device: torch.device
    plan: BatchPlan
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    stop_step: int
    state: TrainState
    fwd_model: nn.Module
    loss_fn: nn.Module
    autocast: Callable
    precision: str
    shards: list
    loader_cfg: LoaderConfig
    resume_url: str | None = None
    resume_data: dict | None = None
    callbacks: list[StepCallback] = field(default_factory=list)
    stop: StopRequest | None = None
    metrics_log: MetricsLog | None = None
    samples_log: MetricsLog | None = None
    trackers: Trackers | None = None
    last: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def request_stop(self, reason: str) -> None:
        """For step callbacks: checkpoint at this step boundary and exit as if pre-empted."""
        self.stop.request(reason)

    def offer_best(self, metric: str, value: float, **info) -> bool:
        """For evaluation callbacks (every rank, the same value): if `value` beats the best so far (higher is
        better; the first offer always does), record it in the resume state (TrainState.extra["best"]) and save
        this step's weights as the best checkpoint. Returns whether it did."""
        best = self.state.extra.get("best")
        if best is not None and not value > best["value"]:
            return False
        self.state.extra["best"] = {"step": self.state.step, "metric": metric, "value": float(value), **info}
        if self.main:
            save_best_checkpoint(self.out_dir, unwrap(self.fwd_model), self.state.extra["best"],
                                 cfgmod.to_dict(self.cfg))
        return True

    def log_record(self, rec: dict, group: str = "train", line: str | None = None) -> None:
        """One metrics.jsonl line (rank 0), the same scalars to TensorBoard / W&B under `group/`, and `line`
        (human text, slip_core/progress.py) on the console: raw JSON stays in metrics.jsonl."""
        self.metrics_log.write(rec)
        self.trackers.log(rec, group)
        if self.main and line:
            print(line, flush=True)


def setup_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """This rank's device (cuda:LOCAL_RANK under `auto` when CUDA is there) and torchrun's process group."""
    device = local_device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_from_env(device)
    return get_rank(), get_world_size(), device


def make_plan(cfg: TrainConfig, world: int, resumed: dict | None) -> BatchPlan:
    """The batch plan: from the config on a fresh start, keeping the checkpoint's global batch and data streams
    on a resume (another world size changes only micro-batch × accumulation)."""
    position = (resumed or {}).get("train_state", {}).get("loader") or {}
    if "global_batch" in position:
        return plan_batch(int(position["global_batch"]), world, cfg.batch_size, cfg.num_workers,
                          streams=int(position["streams"]), exact=True)
    requested = cfg.global_batch or cfg.batch_size * world * cfg.accum_steps
    return plan_batch(requested, world, cfg.batch_size, cfg.num_workers, streams=cfg.data_streams)


def build(cfg: TrainConfig, dataset_manifest: str, out_dir: str, resume: str | None = "latest",
          callbacks=()) -> TrainRun:
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mcfg = get_config(cfg.model, **cfg.model_overrides)
    spec = get_spec(mcfg)
    resume_url = latest_checkpoint(out_dir) if resume == "latest" else resume
    resumed = load_state(resume_url) if resume_url else None
    if resumed is not None and "train_state" not in resumed:
        raise ValueError(f"{resume_url} has no train_state (not a resume checkpoint of this trainer)")
    plan = make_plan(cfg, world, resumed)
    shards = dataset_shards(dataset_manifest)
    samples = cfg.samples_per_epoch or sum(s.samples for s in shards)
    spe = epoch_steps(samples, plan)
    if spe < 1:
        raise ValueError(f"{samples} samples/epoch is less than one step of {plan.global_batch} "
                         f"over {plan.streams} data streams")
    if not cfg.resampled and spe * plan.per_stream > sum(s.samples for s in shards) // plan.streams:
        raise ValueError(f"samples_per_epoch {samples} exceeds one full pass over the dataset; "
                         "set resampled=true for epochs longer than the dataset")
    total_steps = cfg.epochs * spe
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # Seed = seed + rank (SPEC §6); model init uses rank 0's stream and DDP broadcasts it anyway.
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(mcfg).to(device)
    seed_everything(cfg.seed + rank)
    if cfg.grad_checkpointing:
        if not hasattr(model.visual, "set_grad_checkpointing"):
            raise ValueError(f"{cfg.model}: its image tower does not support gradient checkpointing")
        model.visual.set_grad_checkpointing(True)
    loss_fn = spec.loss(LossOptions(cfg.ssl_scale, cfg.ssl_temp, cfg.clip_gather_with_grad))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    fwd_model = model
    if world > 1:
        fwd_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    model.train()
    loader_cfg = LoaderConfig(
        views=spec.views, text=spec.uses_text, seed=cfg.seed, caption_mode=cfg.caption_mode,
        aug=AugmentConfig(image_size=mcfg.image_size, max_pixels=cfg.max_pixels, draft=cfg.draft),
        context_length=mcfg.context_length, force_eot=cfg.force_eot, num_workers=cfg.num_workers,
        shuffle_chunk=cfg.shuffle_chunk, shuffle_shards=cfg.shuffle_shards, resampled=cfg.resampled,
        keys=cfg.record_samples)
    return TrainRun(cfg=cfg, out_dir=out_dir, spec=spec, model_config=mcfg, rank=rank, world=world, device=device,
                    plan=plan, steps_per_epoch=spe, total_steps=total_steps,
                    warmup_steps=int(round(cfg.warmup_epochs * spe)), stop_step=stop_step,
                    state=TrainState(model, optimizer, scaler), fwd_model=fwd_model, loss_fn=loss_fn,
                    autocast=autocast, precision=precision, shards=shards, loader_cfg=loader_cfg,
                    resume_url=resume_url, resume_data=resumed, callbacks=list(callbacks))


# ---------------------------------------------------------------------------------------------- resume
def resume_run(run: TrainRun) -> None:
    """Load the checkpoint found by build (if any) into the run's TrainState; open the logs."""
    if run.resume_data is not None:
        data = run.resume_data
        run.state.load_state_dict(data["train_state"], model_state=data["state_dict"], rank=run.rank,
                                  world=run.world, rng_seed=run.cfg.seed + run.rank + 7919 * int(data["train_state"]["step"]))
        run.resume_data = None  # the weights are in the model now; do not hold a second copy
        if run.main:
            moved = "" if run.state.world_at_save == run.world else (
                f" (written at world size {run.state.world_at_save}: elastic resume, RNG reseeded per rank)")
            print(f"resumed from {run.resume_url} at step {run.state.step}{moved}", flush=True)
    step = run.state.step if run.resume_url else None
    run.metrics_log = MetricsLog(storage.join(run.out_dir, "metrics.jsonl"), run.main, step)
    if run.cfg.record_samples:
        run.samples_log = MetricsLog(storage.join(run.out_dir, "samples.jsonl"), run.main, step)
    run.trackers = Trackers(run.cfg, run.out_dir, run.main)
    if run.main:
        print(f"training {run.cfg.model}: {run.steps_per_epoch} steps/epoch × {run.cfg.epochs} epochs = "
              f"{run.total_steps} steps (stop at {run.stop_step}), {run.plan.describe()}, "
              f"{'resampled shards' if run.cfg.resampled else 'full passes'}, {run.precision}, {run.device}",
              flush=True)


# ---------------------------------------------------------------------------------------------- loop
def make_loader(run: TrainRun, epoch: int) -> EpochLoader:
    p = run.plan
    layout = StreamLayout(p.streams, p.per_stream, p.micro, p.accum, run.rank, run.world, p.workers)
    return EpochLoader(run.shards, run.loader_cfg, layout, epoch=epoch, num_steps=run.steps_per_epoch,
                       state=run.state.loader)


def loop(run: TrainRun) -> None:
    """Optimizer steps until stop_step or a stop request; checkpoints every ckpt_every steps and at the end."""
    state = run.state
    run.stop = StopRequest()
    try:
        while state.step < run.stop_step:
            epoch = state.step // run.steps_per_epoch
            loader = make_loader(run, epoch)
            with contextlib.closing(iter(loader)) as batches:
                run_epoch(run, loader, batches, epoch)
            state.loader = {}
    finally:
        run.stop.restore()


def run_epoch(run: TrainRun, loader: EpochLoader, batches, epoch: int) -> None:
    cfg, state, window = run.cfg, run.state, []
    while state.step < min(run.stop_step, (epoch + 1) * run.steps_per_epoch):
        t0 = time.time()
        micro = next(batches)
        t1 = time.time()
        out = train_step(run.fwd_model, run.loss_fn, state.optimizer, state.scaler, micro, spec=run.spec,
                         device=run.device, autocast=run.autocast, progress=(state.step + 1) / run.total_steps,
                         lr=lr_at(state.step, run.total_steps, run.warmup_steps, cfg.lr, cfg.start_lr, cfg.end_lr))
        state.step += 1
        window.append((t1 - t0, time.time() - t0))
        if run.samples_log is not None:
            keys = gather_object([k for b in micro for k in b["__keys__"]])
            run.samples_log.write({"step": state.step, "keys": [k for part in keys for k in part]})
        if state.step % cfg.log_every == 0 or state.step == run.stop_step:
            run.last = _metrics_record(run, out, epoch, loader, window)
            window = []
        for callback in run.callbacks:  # hook point: watchdogs, leases, in-training evaluation
            callback(run, out)
        stopping = run.stop.should_stop(run.device)
        if state.step % cfg.ckpt_every == 0 or state.step == run.stop_step or stopping:
            checkpoint(run, loader)
        if stopping:
            if run.main:
                print(f"stop requested ({run.stop.reason}): checkpointed step {state.step}, exiting", flush=True)
            raise Preempted(f"stopped ({run.stop.reason}) at step {state.step} (resume with --resume latest)")


def checkpoint(run: TrainRun, loader: EpochLoader) -> None:
    """Collective: the global data position and every rank's RNG go into the step's resume checkpoint."""
    run.metrics_log.flush()  # object stores: records up to this step are durable with the checkpoint
    if run.samples_log is not None:
        run.samples_log.flush()
    position = merge_states(gather_object(loader.state_dict()))
    run.state.loader = {"global_batch": run.plan.global_batch, **position}
    save_resume_checkpoint(run.out_dir, run.state, run.model_config, cfgmod.to_dict(run.cfg),
                           run.cfg.keep_checkpoints, main=run.main)
    if run.main:  # the checkpoint now names the best: other best files are dominated or from a lost trajectory
        prune_best_checkpoints(run.out_dir, (run.state.extra.get("best") or {}).get("step"))
    if dist.is_initialized():
        dist.barrier()


def _metrics_record(run: TrainRun, out: dict, epoch: int, loader: EpochLoader, window: list) -> dict:
    keys = ("loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc")
    vals = torch.tensor([out.get(k, float("nan")) for k in keys], dtype=torch.float64)
    counts = loader.counts()
    cvec = torch.tensor([counts[k] for k in sorted(counts)], dtype=torch.float64)
    if dist.is_initialized():  # mean losses/accuracies, summed skip counters, over ranks
        both = torch.cat([vals, cvec]).to(run.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(both)
        both = both.cpu()
        vals, cvec = both[:5] / dist.get_world_size(), both[5:]
    data_t = sum(w[0] for w in window) / len(window)
    step_t = sum(w[1] for w in window) / len(window)
    rec = {"step": run.state.step, "epoch": epoch, "lr": run.state.optimizer.param_groups[0]["lr"],
           "samples_per_s": round(run.plan.global_batch / step_t, 2), "data_time": round(data_t, 4),
           "step_time": round(step_t, 4)}
    for k, v in zip(keys, vals.tolist()):
        if not math.isnan(v):
            rec[k] = v
    model = unwrap(run.fwd_model)
    if hasattr(model, "logit_scale"):
        rec["logit_scale"] = float(model.logit_scale.detach().exp())
    rec["skipped"] = {k: int(v) for k, v in zip(sorted(counts), cvec.tolist()) if k != "ok"}
    # the console gets a human line (relayed into a bar on a terminal, flows/pretrain.py)
    run.log_record(rec, line=progress.step_line(rec["step"], run.stop_step, rec.get("loss"), rec["samples_per_s"],
                                                (run.stop_step - rec["step"]) * step_t))
    return rec


# ---------------------------------------------------------------------------------------------- finish
def finish(run: TrainRun, t_start: float) -> dict:
    """checkpoint.pt (the final TrainState, loadable by checkpoint.load_checkpoint) and final_metrics.json."""
    last = run.last
    if not last and run.main and storage.exists(run.metrics_log.path):  # resumed an already finished run
        recs = [json.loads(line) for line in storage.read_text(run.metrics_log.path).splitlines() if line.strip()]
        last = next((r for r in reversed(recs) if "loss" in r), {})
    final = {**{k: v for k, v in last.items() if k not in ("samples_per_s", "data_time", "step_time")},
             "steps": run.state.step, "total_steps": run.total_steps, "world_size": run.world,
             "global_batch": run.plan.global_batch, "micro_batch": run.plan.micro, "accum_steps": run.plan.accum,
             "train_time_s": round(time.time() - t_start, 2), "model": run.cfg.model, **publish_best(run)}
    save_train_checkpoint(storage.join(run.out_dir, "checkpoint.pt"), run.state, run.model_config,
                          cfgmod.to_dict(run.cfg), main=run.main, metrics=final)
    if run.main:
        storage.atomic_write_text(storage.join(run.out_dir, "final_metrics.json"), json.dumps(final, indent=2))
    close_logs(run)
    if dist.is_initialized():
        dist.barrier()
    return final


def publish_best(run: TrainRun) -> dict:
    """checkpoint_best.pt next to checkpoint.pt (a copy of the best step's weights) and its final-metrics keys:
    best_step, best_metric, best_value (plus what the evaluation recorded). {} when nothing was offered."""
    best = run.state.extra.get("best")
    if not best:
        return {}
    out = {f"best_{k}": v for k, v in best.items()}
    src = best_checkpoint_url(run.out_dir, int(best["step"]))
    if run.main and not storage.exists(src):  # e.g. continued (--resume-from) from another run's checkpoint
        print(f"warning: best checkpoint {src} is missing: {BEST_FILE} not written", file=sys.stderr, flush=True)
        return {**out, "best_missing": True}
    if run.main:
        storage.put_file_atomic(src, storage.join(run.out_dir, BEST_FILE))
    return out


def close_logs(run: TrainRun) -> None:
    for log in (run.metrics_log, run.samples_log, run.trackers):
        if log is not None:
            log.close()


def train(cfg: TrainConfig, dataset_manifest: str, out_dir: str, resume: str | None = "latest",
          callbacks: list[StepCallback] = ()) -> dict:
    """Train on a dataset artifact; write checkpoints/, metrics.jsonl, checkpoint.pt and final_metrics.json
    under `out_dir`; return the final metrics (rank 0's view, losses averaged over ranks). Raises Preempted
    after checkpointing when a signal or a callback asked to stop."""
    t_start = time.time()
    run = build(cfg, dataset_manifest, out_dir, resume, callbacks)
    resume_run(run)
    try:
        loop(run)
    except Preempted:
        close_logs(run)
        raise
    return finish(run, t_start)


# ---------------------------------------------------------------------------------------------- CLI
def config_from_args(preset: str, config_json: str | None, sets: list[str]) -> TrainConfig:
    overrides = {**(json.loads(storage.read_text(config_json)) if config_json else {}), **cfgmod.parse_sets(sets)}
    try:
        return cfgmod.resolve(TRAIN_PRESETS, preset, overrides, what="training")
    except cfgmod.ConfigError as e:
        raise SystemExit(str(e)) from None


def main(argv: list[str] | None = None, callback_factories: tuple[CallbackFactory, ...] = ()) -> int:
    """The trainer's CLI; `callback_factories` (from an entry module above slip_core, e.g.
    evaluation/train_entry.py) add step callbacks built from the resolved config."""
    p = argparse.ArgumentParser(prog="python -m slip_core.trainer", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="dataset manifest URL")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config-json", default=None, help="JSON file of TrainConfig fields (over the preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default="latest", help="'latest', a checkpoint path, or 'none'")
    p.add_argument("--published", default=None, help="manifest URL of the artifact this run is for: stop if it appears")
    p.add_argument("--lease-wait", type=float, default=120.0, help="seconds to wait for another writer of --out")
    args = p.parse_args(argv)
    procs.follow_parent(graceful=True, grace_s=20.0)  # torchrun gone: checkpoint at the step boundary, exit
    cfg = config_from_args(args.preset, args.config_json, args.sets)
    extra = [c for factory in callback_factories for c in factory(cfg)]
    try:  # one writer per run folder; each step checks the lease before the step's checkpoint is written
        with locks.rank0_writer(args.out, watch=(args.published,), wait_s=args.lease_wait, purpose="trainer"):
            train(cfg, args.dataset, args.out, resume=None if args.resume == "none" else args.resume,
                  callbacks=[lambda run, out: locks.ensure_writer(run.out_dir), *extra])
    except (NonFiniteLoss, locks.LockBusy, locks.LeaseLost) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
