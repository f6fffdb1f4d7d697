"""GPU training-step benchmark: SLIP_VITB16 bf16 step — samples/s, MFU, peak memory — eager vs gradient
checkpointing vs torch.compile, in one run that ends in under 5 minutes.

    .venv/bin/python bench/gpu_step.py                          # on a GPU: SLIP_VITB16, batch 64/device
    .venv/bin/python bench/gpu_step.py --model SLIP_VIT_TINY --batch 8 --steps 3   # CPU smoke run

Prints one JSON line: value = best variant's samples/s, baseline = eager samples/s, ratio = value/baseline,
plus every variant's samples/s, MFU (analytic FLOPs from slip_core.compute / device peak) and peak memory.
The step is slip_core.trainer.train_step on synthetic inputs (data loading is bench/loader.py's job).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slip_core import compute  # noqa: E402
from slip_core.registry import MODEL_PRESETS, build_loss, build_model, get_spec  # noqa: E402
from slip_core.optim import build_optimizer  # noqa: E402
from slip_core.trainer import train_step  # noqa: E402


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in compute.PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def synthetic_batch(cfg, batch: int) -> dict:
    img = lambda: torch.randn(batch, 3, cfg.image_size, cfg.image_size)  # noqa: E731
    return {"image": img(), "aug1": img(), "aug2": img(),
            "text": torch.randint(1, cfg.vocab_size - 2, (batch, cfg.context_length))}


def run_variant(args, device, grad_ckpt: bool, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    if grad_ckpt:
        model.visual.set_grad_checkpointing(True)
    cfg = model.config
    loss_fn = build_loss(cfg.kind)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    step_model = torch.compile(model) if compiled else model
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast("cpu", enabled=False))
    scaler = torch.amp.GradScaler(enabled=False)
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, args.batch).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = lambda: train_step(step_model, loss_fn, opt, scaler, [batch], spec=get_spec(cfg), device=device,  # noqa: E731
                              autocast=autocast, lr=1e-4)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    sps = args.batch * args.steps / dt
    peak = device_peak_tflops(device)
    flops = compute.flops_per_sample(cfg).train
    out = {"samples_per_s": round(sps, 2), "step_ms": round(1000 * dt / args.steps, 1),
           "mfu": round(flops * sps / (peak * 1e12), 4) if peak else None}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del model, opt, step_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", default="SLIP_VITB16" if cuda else "SLIP_VIT_TINY")
    ap.add_argument("--batch", type=int, default=64 if cuda else 8)
    ap.add_argument("--steps", type=int, default=20 if cuda else 3)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1)
    ap.add_argument("--variants", default="eager,ckpt,compile,ckpt+compile" if cuda else "eager,ckpt")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = {}
    for v in args.variants.split(","):
        results[v] = run_variant(args, device, grad_ckpt="ckpt" in v, compiled="compile" in v)
    best = max(results, key=lambda k: results[k]["samples_per_s"])
    base = results["eager"]["samples_per_s"]
    print(json.dumps({"name": "gpu_step", "model": args.model, "batch_per_device": args.batch,
                      "device": torch.cuda.get_device_name() if cuda else "cpu", "value": results[best]["samples_per_s"],
                      "baseline": base, "ratio": round(results[best]["samples_per_s"] / base, 3), "unit": "samples/s",
                      "best_variant": best, "train_gflops_per_sample": round(compute.flops_per_sample(
                          MODEL_PRESETS[args.model]).train / 1e9, 1),
                      "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
