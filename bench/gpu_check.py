"""Stages of the device check (bench/gpu_check.sh runs them on a GPU machine); each prints JSON lines.

    python bench/gpu_check.py env
    python bench/gpu_check.py train --out DIR [--steps 50] [--device cuda]
    python bench/gpu_check.py eval --checkpoint DIR/full/checkpoint.pt [--sets digits,fashion_mnist,mnist]
    python bench/gpu_check.py nccl --result FILE      # summarise tests/dist_scripts/losses_equivalence.py

`train`: a tiny SLIP (the `tiny` preset) on a dataset built from local real images (scikit-learn's digits at
64 px + the photo corpus: both ship in wheels, no download), `steps` optimizer steps on the device, then the
same run cut at half and resumed; reports throughput and whether the resumed parameters are bit-identical
(deterministic algorithms on). `eval`: zero-shot and linear probe of that checkpoint on each local eval set
present, through the eval stage's own entry point with device=cuda when it takes one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------ env
def stage_env(_: argparse.Namespace) -> int:
    import torch

    rec = {"name": "gpu_check_env", "status": "ok", "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count()}
    if rec["cuda"]:
        rec.update(device=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported(),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for pkg in ("timm", "open_clip", "webdataset", "cv2", "sklearn", "skimage"):
        try:
            rec[pkg] = getattr(__import__(pkg), "__version__", "present")
        except ImportError:
            rec[pkg] = None
    emit(rec)
    return 0


# ------------------------------------------------------------------------------------------ train
def build_dataset(root: str) -> str:
    """Digits (upscaled to 64 px, captioned) + the photo corpus as a webdataset dataset artifact."""
    import numpy as np
    from PIL import Image

    from datasets.offline import sklearn_digits
    from tests._train_util import jpeg_bytes, photo_samples, write_dataset

    images, labels = sklearn_digits()
    samples = [(jpeg_bytes(Image.fromarray(img).resize((64, 64), Image.BICUBIC)), f"a photo of the digit {int(y)}",
                f"a handwritten {int(y)}" if i % 2 else "", int(y)) for i, (img, y) in enumerate(zip(images, labels))]
    samples += photo_samples(short_side=96)
    order = np.random.default_rng(0).permutation(len(samples))
    return write_dataset(root, [samples[i] for i in order], per_shard=256, name="gpu-check")


def stage_train(args: argparse.Namespace) -> int:
    import torch

    from slip_core import trainer as T
    from slip_core.checkpoint import load_state

    torch.use_deterministic_algorithms(True, warn_only=True)  # needs CUBLAS_WORKSPACE_CONFIG (gpu_check.sh)
    ds = build_dataset(os.path.join(args.out, "ds"))
    base = dataclasses.replace(T.TRAIN_PRESETS["tiny"], epochs=1, device=args.device, num_workers=args.workers,
                               log_every=1, ckpt_every=10_000)
    t0 = time.time()
    final = T.train(dataclasses.replace(base, max_steps=args.steps), ds, os.path.join(args.out, "full"), resume=None)
    seconds = time.time() - t0
    cut = os.path.join(args.out, "cut")
    T.train(dataclasses.replace(base, max_steps=args.steps // 2), ds, cut, resume=None)
    T.train(dataclasses.replace(base, max_steps=args.steps), ds, cut)  # resumes from the half-way checkpoint
    a = load_state(os.path.join(args.out, "full", "checkpoint.pt"))["state_dict"]
    b = load_state(os.path.join(cut, "checkpoint.pt"))["state_dict"]
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    with open(os.path.join(args.out, "full", "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steady = [r["samples_per_s"] for r in recs[len(recs) // 2:]]
    emit({"name": "gpu_train_resume", "model": base.model, "device": args.device, "steps": final["steps"],
          "global_batch": final["global_batch"], "precision": "bf16" if args.device != "cpu" else "fp32",
          "wall_s": round(seconds, 1), "samples_per_s": round(sum(steady) / len(steady), 1),
          "loss_first": round(recs[0]["loss"], 4), "loss_last": round(recs[-1]["loss"], 4),
          "resume_bit_identical": diff == 0.0, "resume_max_abs_diff": diff,
          "checkpoint": os.path.join(args.out, "full", "checkpoint.pt")})
    return 0


# ------------------------------------------------------------------------------------------ eval
def eval_tasks():
    """The eval stage's entry point, wherever this checkout keeps it (top-level `evaluation` or the library)."""
    try:
        from evaluation import tasks
    except ImportError:
        from slip_core.evaluation import tasks
    return tasks


def stage_eval(args: argparse.Namespace) -> int:
    tasks = eval_tasks()
    from datasets import catalog

    lm = tasks.common.load_model(args.checkpoint)
    fields = {f.name for f in dataclasses.fields(tasks.EvalConfig)}
    cfg = tasks.EvalConfig(max_samples=2000, max_train_samples=4000, **(
        {"device": args.device} if "device" in fields else {}))
    on_device = "device" in fields
    for name in args.sets.split(","):
        for task in ("zeroshot", "linear"):
            rec = {"name": f"gpu_eval_{task}", "dataset": name, "device": args.device if on_device else "cpu"}
            if not on_device and args.device != "cpu":
                rec["note"] = "this checkout's eval entry points take no device: ran on the CPU"
            t0 = time.time()
            try:
                catalog.ensure(name)
                res = tasks.run_task(task, lm, name, cfg, cache_dir=os.path.join(args.out, "eval-cache"),
                                     log=lambda line: None)
            except (FileNotFoundError, OSError, KeyError) as e:  # a set this machine does not have
                emit({**rec, "status": "skipped", "reason": str(e).splitlines()[0][:200]})
                continue
            emit({**rec, "status": "ok", "metric": res.get("metric"), "value": res.get("value"),
                  "num_samples": res.get("num_samples"), "seconds": round(time.time() - t0, 2)})
    return 0


# ------------------------------------------------------------------------------------------ nccl
def stage_nccl(args: argparse.Namespace) -> int:
    with open(args.result) as f:
        ranks = json.load(f)
    for mode in ("reference", "gather_with_grad"):
        m = [r[mode] for r in ranks]
        emit({"name": "gpu_nccl_equivalence", "mode": mode, "world": ranks[0]["world"],
              "loss_diff": max(x["loss_diff"] for x in m), "grad_diff": max(x["grad_diff"] for x in m),
              "bn_running_mean_diff": max(x["bn_running_mean_diff"] for x in m),
              "ok": all(x["loss_diff"] < 1e-5 and x["grad_diff"] < 1e-5 for x in m)})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    sub.add_parser("env").set_defaults(fn=stage_env)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    t.add_argument("--workers", type=int, default=4)
    t.set_defaults(fn=stage_train)
    e = sub.add_parser("eval")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", default=os.path.join(ROOT, "gpu_check_out"))
    e.add_argument("--sets", default="digits,fashion_mnist,mnist")
    e.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    e.set_defaults(fn=stage_eval)
    n = sub.add_parser("nccl")
    n.add_argument("--result", required=True)
    n.set_defaults(fn=stage_nccl)
    args = p.parse_args(argv)
    if getattr(args, "steps", 2) < 2:
        p.error("--steps must be >= 2 (the resume check cuts the run in half)")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
