"""`slip reproduce --preset NAME --dry-run`: the plan (stages, shards, steps) and a compute estimate."""
from __future__ import annotations

import math

from slip_core import compute
from slip_core.config import to_dict


def dry_run_plan(preset: str) -> str:
    from datasets.config import DATASET_PRESETS
    from flows.presets import reproduce_preset
    from slip_core.registry import MODEL_PRESETS
    from slip_core.trainer import TRAIN_PRESETS, resolve

    p = reproduce_preset(preset)
    ds, tr = DATASET_PRESETS[p.dataset], resolve(TRAIN_PRESETS[p.train])
    model = MODEL_PRESETS[tr.model]
    rows = p.dataset_rows
    shards = math.ceil(rows / ds.number_sample_per_shard)
    samples_per_epoch = tr.samples_per_epoch or rows
    global_batch = tr.global_batch or tr.batch_size * tr.accum_steps
    steps_per_epoch = samples_per_epoch // global_batch  # drop_last, as the reference (SPEC §9.7)
    total_steps = steps_per_epoch * tr.epochs
    samples = total_steps * global_batch
    flops = compute.flops_per_sample(model)
    gpus = max(1, global_batch // tr.batch_size)
    lines = [
        f"plan for preset {preset!r}",
        f"  1. dataset  [{p.dataset}] ~{rows:,} input rows -> {shards:,} shards of {ds.number_sample_per_shard:,} "
        f"({ds.image_size}px {ds.resize_mode}, img2dataset {ds.processes_count} procs x {ds.thread_count} threads)",
        f"  2. pretrain [{p.train}] {model.name}: {tr.epochs} epochs x {steps_per_epoch:,} steps = {total_steps:,} steps, "
        f"global batch {global_batch:,} ({tr.batch_size}/device), warmup {int(tr.warmup_epochs * steps_per_epoch):,} steps",
        f"     optimizer: AdamW lr {tr.lr:g} wd {tr.weight_decay:g} "
        f"betas {tuple(tr.betas)}; ssl_scale {tr.ssl_scale}, ssl_temp {tr.ssl_temp}; precision {tr.precision}",
        f"  3. eval     [{p.eval}] zero-shot, linear probe, fine-tune",
        "compute estimate (analytic FLOPs, training = 3 x forward):",
        f"  {flops.forward / 1e9:,.1f} GFLOPs forward / {flops.train / 1e9:,.1f} GFLOPs train per sample; "
        f"{samples:,} samples -> {flops.train * samples:.3e} FLOPs",
    ]
    for dev in ("V100", "A100", "H100"):
        h = compute.gpu_hours(model, samples, dev, mfu=0.4)
        lines.append(f"  {dev}: {h:,.0f} GPU-hours at 40% MFU ({h / gpus:,.1f} h wall on {gpus} GPUs)")
    lines.append("train config: " + str(to_dict(tr)))
    return "\n".join(lines)
