"""Benchmark: evaluation feature extraction and the eval tasks on CPU (issue 17 item 1).

Data: BENCH_EVAL_SAMPLES Fashion-MNIST TEST images (torchvision layout, prepared in a temp root), the tiny CLIP
(64 px) with random weights, batch 256, fp32. Measured in one run:
* baseline: the straightforward loop (DataLoader, model forward per batch, no device handling, no ranks);
  after one warm-up pass, baseline and ours alternate twice, best of two each;
* ours, 1 process: slip_core.features.extract (the same work plus device / precision handling);
* ours, 2 gloo ranks under torchrun, one intra-op thread each: every rank extracts half, rank 0 gathers
  (wall time on rank 0 from the start of extraction to the gathered arrays); the single process gets the two
  cores. Ratio = throughput / baseline. On a shared 2-core box the 2-rank figure mostly shows the overhead of
  slicing + gathering; ranks pay off with one GPU per rank;
* the zero-shot and fast linear-probe tasks end to end (evaluation.tasks.run_task, features not cached).
Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

N = int(os.environ.get("BENCH_EVAL_SAMPLES", 2000))
BATCH = 256


def _setup(root: str):
    from datasets import catalog
    from evaluation import common
    from slip_core.checkpoint import save_checkpoint
    from slip_core.registry import build_model

    catalog.prepare("fashion_mnist", root)
    ckpt = os.path.join(root, "tiny.pt")
    if not os.path.exists(ckpt):
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_model("CLIP_VIT_TINY").eval())
    lm = common.load_model(ckpt)
    loaded = catalog.load("fashion_mnist", "test", common.zeroshot_transform(64), root, max_samples=N)
    return ckpt, lm, loaded


@torch.no_grad()
def _baseline(model, dataset) -> float:
    t0 = time.perf_counter()
    for images, _ in torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False):
        model.encode_image(images)
    return time.perf_counter() - t0


def _rank_worker(root: str, out: str) -> None:
    """One torchrun rank: extract across ranks; rank 0 writes the wall time."""
    import torch.distributed as dist

    from slip_core.distributed import get_rank, init_from_env
    from slip_core.features import extract

    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"))
    _, lm, loaded = _setup(root)
    dist.barrier()
    t0 = time.perf_counter()
    x, _ = extract(lm.model.encode_image, loaded.dataset, BATCH)
    if get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"s": time.perf_counter() - t0, "n": int(len(x))}, f)
    dist.destroy_process_group()


def main() -> None:
    from evaluation.tasks import EvalConfig, run_task
    from slip_core.features import extract

    root = tempfile.mkdtemp(prefix="bench-eval-")
    ckpt, lm, loaded = _setup(root)
    _baseline(lm.model, loaded.dataset)  # warm-up: page cache, first-call allocations
    base_s = ours_s = float("inf")
    for _ in range(2):  # alternate, best of two each: a shared box drifts
        base_s = min(base_s, _baseline(lm.model, loaded.dataset))
        t0 = time.perf_counter()
        x, _ = extract(lm.model.encode_image, loaded.dataset, BATCH, device="cpu")
        ours_s = min(ours_s, time.perf_counter() - t0)
    out = os.path.join(root, "ranks.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.abspath(__file__), "--rank-worker", root, out], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    ranks = json.load(open(out))
    cfg = EvalConfig(data_root=root, max_samples=N, max_train_samples=N, device="cpu", batch_size=BATCH)
    timings = {}
    for task in ("zeroshot", "linear"):
        t0 = time.perf_counter()
        rec = run_task(task, lm, "fashion_mnist", cfg, cache_dir=os.path.join(root, f"cache-{task}"), log=lambda s: None)
        timings[task] = {"s": round(time.perf_counter() - t0, 2), "value": round(rec["value"], 2)}
    print(json.dumps({
        "bench": "eval_features", "samples": int(len(x)), "batch": BATCH, "model": "CLIP_VIT_TINY (64 px)",
        "baseline_samples_per_s": round(N / base_s, 1), "extract_samples_per_s": round(N / ours_s, 1),
        "extract_vs_baseline": round(base_s / ours_s, 3),
        "two_gloo_ranks_samples_per_s": round(ranks["n"] / ranks["s"], 1),
        "two_ranks_vs_baseline": round(base_s / ranks["s"], 3),
        "zeroshot_task_s": timings["zeroshot"]["s"], "linear_fast_task_s": timings["linear"]["s"],
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        _rank_worker(*sys.argv[2:4])
    else:
        main()
