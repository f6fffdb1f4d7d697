"""Benchmark: one SLIP optimizer step on CPU (slip_core.trainer.train_step): samples/s and peak RSS.

Configurations (issue 4): the tiny preset (SLIP_VIT_TINY, 64 px, its batch 32) and SLIP_VITS16 (224 px)
at batch 8, fp32. Baseline measured in the same run: the CLIP step of the same tiny model and batch
(SLIP adds two SSL image passes + the head: the paper's "about 3x the image activations of CLIP"), so
ratio = SLIP / CLIP throughput. Each configuration runs in a fresh subprocess so its peak RSS is its own.
Inputs are real: one batch from the loader over a shard of Fashion-MNIST images + photos.
Prints one JSON line.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", 3))


def measure(model_name: str, batch: int, dataset: str) -> dict:
    import torch

    from slip_core.augment import AugmentConfig
    from slip_core.data import EpochLoader, LoaderConfig, StreamLayout, dataset_shards
    from slip_core.optim import build_optimizer
    from slip_core.registry import build_model, get_spec
    from slip_core.trainer import train_step

    torch.manual_seed(0)
    model = build_model(model_name)
    cfg = model.config
    spec = get_spec(cfg)
    lcfg = LoaderConfig(views=spec.views, text=spec.uses_text, aug=AugmentConfig(image_size=cfg.image_size))
    layout = StreamLayout(streams=1, per_stream=batch, micro=batch, accum=1)
    micro = next(iter(EpochLoader(dataset_shards(dataset), lcfg, layout, epoch=0, num_steps=1)))
    loss_fn = spec.loss()
    opt = build_optimizer(model, 1e-4, 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    kw = dict(spec=spec, device=torch.device("cpu"), autocast=contextlib.nullcontext, lr=1e-4)
    train_step(model, loss_fn, opt, scaler, micro, **kw)  # warm-up (allocations, optimizer state)
    t = time.perf_counter()
    for _ in range(STEPS):
        train_step(model, loss_fn, opt, scaler, micro, **kw)
    dt = (time.perf_counter() - t) / STEPS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"samples_per_s": round(batch / dt, 2), "step_s": round(dt, 3), "peak_rss_mb": round(rss, 1)}


def child(model_name: str, batch: int, dataset: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--child", model_name, str(batch), dataset], env=env,
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from tests._train_util import fashion_samples, photo_samples, write_dataset

    with tempfile.TemporaryDirectory() as d:
        ds = write_dataset(d, fashion_samples(64, seed=0) + photo_samples(short_side=256), per_shard=100)
        slip_tiny = child("SLIP_VIT_TINY", 32, ds)
        clip_tiny = child("CLIP_VIT_TINY", 32, ds)
        vits16 = child("SLIP_VITS16", 8, ds)
    print(json.dumps({
        "name": "train_step_slip_tiny_cpu", "value": slip_tiny["samples_per_s"],
        "baseline": clip_tiny["samples_per_s"], "ratio": round(slip_tiny["samples_per_s"] / clip_tiny["samples_per_s"], 3),
        "unit": "samples/s", "baseline_desc": "CLIP step, same tiny model and batch (SLIP/CLIP cost ratio)",
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "slip_tiny_b32": slip_tiny, "clip_tiny_b32": clip_tiny, "slip_vits16_b8": vits16}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        main()
